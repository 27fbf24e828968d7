"""Sample a trained run by the FID protocol, write ADM's .npz, and score it.

python -m launch.evaluate --workdir=runs/imagenet256 --num_samples=50000 --cfg_scale=1.5 \
    --sampler=ddpm --steps=250 --inception=inception_fid.npz \
    --reference=VIRTUAL_imagenet256_labeled.npz
python -m launch.evaluate --workdir=runs/quickstart --num_samples=200 --labels=balanced
python -m launch.evaluate --workdir=gs://bucket/run --step=400000 ...   # a milestone checkpoint

Resumable: rerun the same command after an interruption and finished batches are kept.
Multi-process: run the same command on every host, as launch.train (launch/multiprocess.py).
See docs/evaluation.md for the protocol and for running ADM's evaluator on the .npz.

The console (stderr) shows progress and a closing summary with the scores; stdout gets the
result as JSON (also written to <output_dir>/<name>.json), for `> scores.json`.
"""

import json

from absl import app, flags, logging

from diffussm_jax import inference
from diffussm_jax.training import checkpoint
from launch import cli, console, multiprocess

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A directory written by launch.train (local or gs://).")
flags.DEFINE_integer("num_samples", 50_000, "Number of samples (FID-50K: 50000).")
flags.DEFINE_string("sampler", None, "ddpm | ddim | dpm++2m (default: the run's config).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config).")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; 1 disables it.")
flags.DEFINE_integer("seed", 0, "Seed of the labels and the sampling noise.")
flags.DEFINE_integer("batch_size", None, "Images per sampling call (default: global batch).")
flags.DEFINE_enum("labels", "uniform", ["uniform", "balanced"], "Uniform draws or cycling.")
flags.DEFINE_integer("guidance_channels", None, "Guide the first C channels only (DiT).")
flags.DEFINE_string("vae", None, "VAE that decodes latent samples (default: config.vae.path).")
flags.DEFINE_string("inception", None, "Converted Inception weights (.npz / .safetensors).")
flags.DEFINE_string("reference", None, "ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz.")
flags.DEFINE_enum(
    "inception_preprocessing",
    "tf_graph",
    ["tf_graph", "pytorch_fid"],
    "Inception input: ADM's TF graph (TF1 resize, (x-128)/128) or pytorch-fid's.",
)
flags.DEFINE_string("output_dir", None, "Where samples and scores go (default: <workdir>/eval).")
flags.DEFINE_integer(
    "step", None, "Checkpoint step to use (default: the newest); see config.keep_every_steps."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    multiprocess.initialize()
    result = inference.evaluate(
        FLAGS.workdir,
        num_samples=FLAGS.num_samples,
        sampler=FLAGS.sampler,
        steps=FLAGS.steps,
        cfg_scale=FLAGS.cfg_scale,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        labels=FLAGS.labels,
        guidance_channels=FLAGS.guidance_channels,
        vae_path=FLAGS.vae,
        inception_path=FLAGS.inception,
        reference_path=FLAGS.reference,
        inception_preprocessing=FLAGS.inception_preprocessing,
        output_dir=FLAGS.output_dir,
        checkpoint_step=FLAGS.step,
    )
    for line in inference.summary_lines(result):
        logging.info("%s", line)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(
        main,
        user_errors=(
            checkpoint.CheckpointStepNotFoundError,
            checkpoint.UnsupportedCheckpointLocation,
        ),
    )
