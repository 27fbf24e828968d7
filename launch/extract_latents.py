"""Encode a dataset's images (and their mirrors) with the frozen VAE into a latent tfds dataset.

    python -m launch.extract_latents --source=imagenet2012 --data_dir=$TFDS_DIR \
        --vae=weights/sd-vae-ft-ema --resolution=256          # -> imagenet2012_latents_256
    python -m launch.extract_latents --source=lsun/church_outdoor --data_dir=$TFDS_DIR \
        --vae=weights/sd-vae-ft-ema --resolution=256          # -> lsun_church_outdoor_latents_256
    python -m launch.extract_latents --source=folder:/data/my_images --vae=... \
        --resolution=256 --output_name=my_images_latents_256 --output_data_dir=$TFDS_DIR

Interrupted? Run the same command again: finished shards are kept, the rest are written.
Several processes (hosts) split the shards: run the same command on every host with
--coordinator_address=host0:port --num_processes=N --process_id=i (on Cloud TPU, SLURM and
Open MPI the processes find each other; launch/multiprocess.py). docs/latents.md has the
downloads and measured times.
"""

from absl import app, flags

from diffussm_jax.data import latents
from launch import cli, console, multiprocess

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "source", None, "tfds dataset name (imagenet2012, lsun/bedroom, ...) or folder:/path."
)
flags.DEFINE_string("split", "train", "Source split (tfds sources).")
flags.DEFINE_string("data_dir", None, "tfds data_dir of the source (default: tfds' default).")
flags.DEFINE_string("vae", None, "diffusers VAE directory (config.json + .safetensors).")
flags.DEFINE_integer("resolution", 256, "ADM center-crop size in pixels (256 or 512).")
flags.DEFINE_string("output_name", None, "Output tfds name (default: <source>_latents_<res>).")
flags.DEFINE_string("output_data_dir", None, "Where the latents go (default: --data_dir).")
flags.DEFINE_integer("images_per_shard", 1024, "Images per shard file (the resumption unit).")
flags.DEFINE_integer("batch_size", 32, "Images per encoder call per process (x2 with mirrors).")
flags.DEFINE_enum("latent_dtype", "float32", ["float32", "float16"], "Stored latent dtype.")
flags.DEFINE_integer("max_images", None, "Only the first N images (trials, timing).")
flags.DEFINE_integer("max_shards", None, "Stop after writing N shards (rerun to continue).")
flags.DEFINE_integer("reader_threads", 8, "Threads that read and crop images.")
flags.mark_flags_as_required(["source", "vae"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    multiprocess.initialize()
    result = latents.extract_latents(
        source=FLAGS.source,
        split=FLAGS.split,
        data_dir=FLAGS.data_dir,
        vae_path=FLAGS.vae,
        resolution=FLAGS.resolution,
        output_name=FLAGS.output_name,
        output_data_dir=FLAGS.output_data_dir,
        images_per_shard=FLAGS.images_per_shard,
        batch_size=FLAGS.batch_size,
        latent_dtype=FLAGS.latent_dtype,
        max_images=FLAGS.max_images,
        max_shards=FLAGS.max_shards,
        reader_threads=FLAGS.reader_threads,
    )
    state = "complete" if result.complete else "incomplete (rerun to continue)"
    print(
        f"{result.version_dir}: {state}; wrote {len(result.written)} shards, kept "
        f"{len(result.skipped)}, {result.images_per_second:.3g} images/s"
    )


if __name__ == "__main__":
    cli.run(main)
