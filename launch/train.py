"""Train (or resume) a model.

    python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart
    python -m launch.train --config=configs/imagenet256.py:model=DiffuSSM-XL \
        --config.global_batch_size=64 --workdir=gs://bucket/run

Config files are Python and are executed: only pass config files you trust.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from diffussm_jax import training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file[:args].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("Config:\n%s", FLAGS.config)
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
