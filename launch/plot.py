"""Plot a run's metrics: loss (total and per quartile of t), learning rate, gradient norm,
img/s and evaluation metrics against steps, into <workdir>/plots/training.png.

    python -m launch.plot --workdir=runs/quickstart

launch.train writes the same plot at every sample grid and at the end; this redraws it at any
time, for example while a run is going or for a run from before plots existed.
"""

from absl import app, flags

from diffussm_jax.training import plots
from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A directory written by launch.train (with metrics.jsonl).")
flags.DEFINE_string("title", None, "Figure title (default: the workdir's name).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(plots.write(FLAGS.workdir, title=FLAGS.title))


if __name__ == "__main__":
    cli.run(main)
