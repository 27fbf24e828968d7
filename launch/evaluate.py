"""Sample a trained run and score the samples (digits: offline classifier metrics).

python -m launch.evaluate --workdir=runs/quickstart --num_samples=1000
"""

import json

from absl import app, flags

from diffussm_jax.training import evaluate_workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A directory written by launch.train.")
flags.DEFINE_integer("num_samples", 1000, "Number of samples (labels cycle over the classes).")
flags.DEFINE_string("sampler", None, "ddpm | ddim | dpm++2m (default: the run's config).")
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config).")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; 1 disables it.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = evaluate_workdir.evaluate(
        FLAGS.workdir,
        num_samples=FLAGS.num_samples,
        sampler=FLAGS.sampler,
        steps=FLAGS.steps,
        cfg_scale=FLAGS.cfg_scale,
        seed=FLAGS.seed,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
