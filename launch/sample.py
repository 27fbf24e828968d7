"""Sample a trained run's EMA parameters into an ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels).

    python -m launch.sample --workdir=runs/quickstart --num_samples=64 --output=runs/q/s.npz \
        --sampler=dpm++2m --steps=25 --cfg_scale=2 --labels=0,1,2 --seed=0
    python -m launch.sample --workdir=runs/imagenet256 --num_samples=64 --output=s.npz \
        --vae=weights/sd-vae-ft-ema      # latent models: the VAE that decodes (docs/latents.md)
    python -m launch.sample --workdir=gs://bucket/run --step=100000 --output=gs://bucket/s.npz
        # a milestone checkpoint (config.keep_every_steps) of a run in a bucket
"""

from absl import app, flags

from diffussm_jax import inference
from diffussm_jax.training import checkpoint
from launch import cli, console

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A directory written by launch.train (local or gs://).")
flags.DEFINE_integer("num_samples", 64, "Number of samples.")
flags.DEFINE_string("output", None, "Output .npz path (a PNG grid is written beside it).")
flags.DEFINE_string(
    "sampler",
    None,
    "Gaussian runs: ddpm | ddim | dpm++2m; flow runs: euler | heun (default: the run's config).",
)
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config).")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; 1 disables it.")
flags.DEFINE_list("labels", None, "Class labels to cycle through (default: uniform random).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", None, "Samples per batch (default: the run's global batch).")
flags.DEFINE_string(
    "vae", None, "Latent models: diffusers VAE directory (default: the run's config.vae.path)."
)
flags.DEFINE_integer(
    "step", None, "Checkpoint step to use (default: the newest); see config.keep_every_steps."
)
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    paths = inference.sample_to_npz(
        FLAGS.workdir,
        FLAGS.output,
        num_samples=FLAGS.num_samples,
        sampler=FLAGS.sampler,
        steps=FLAGS.steps,
        cfg_scale=FLAGS.cfg_scale,
        labels=[int(label) for label in FLAGS.labels] if FLAGS.labels else None,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        vae_path=FLAGS.vae,
        checkpoint_step=FLAGS.step,
    )
    print(f"samples: {paths['npz']}\ngrid:    {paths['png']}")
    if "digits_accuracy" in paths:
        print(
            f"digits:  {paths['digits_accuracy']:.1%} of {FLAGS.num_samples} classified as the "
            "requested digit"
        )


if __name__ == "__main__":
    cli.run(
        main,
        user_errors=(
            checkpoint.CheckpointStepNotFoundError,
            checkpoint.UnsupportedCheckpointLocation,
        ),
    )
