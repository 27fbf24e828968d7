"""Train (or resume) a model, as one process or as one of several (multi-host).

    python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart
    python -m launch.train --config=configs/imagenet256.py:model=DiffuSSM-XL \
        --config.global_batch_size=64 --workdir=/mnt/shared/runs/xl256

Multi-process: on Cloud TPU pods and under SLURM (`srun`) or Open MPI (`mpirun`) every process
runs the same command and jax.distributed is initialised automatically. Elsewhere pass the
coordinator explicitly to every process (docs/pod.md has full recipes):

    python -m launch.train ... --coordinator_address=host0:12345 --num_processes=2 --process_id=0
    python -m launch.train ... --coordinator_address=host0:12345 --num_processes=2 --process_id=1

The console shows the run's config in five lines (all of it is in <workdir>/config.json),
progress (a bar on a terminal, else a line every --progress_every_secs) and a closing summary;
--library_logs brings back other libraries' INFO logs. Plots: <workdir>/plots/training.png.

Config files are Python and are executed: only pass config files you trust.
"""

from absl import app, flags
from ml_collections import config_flags

from diffussm_jax import models, training
from diffussm_jax.training import checkpoint
from launch import cli, console, multiprocess

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file[:args].", lock_config=True)
flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and samples (local or gs://bucket/...)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    multiprocess.initialize()
    training.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(
        main,
        user_errors=(
            checkpoint.UnsupportedCheckpointLocation,
            models.PrecisionError,
            models.ModelFieldError,
        ),
    )
