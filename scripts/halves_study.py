"""Which recipe choices let a tiny model draw the requested class? A 30-second controlled study.

Trains the quickstart's `:smoke` model (or DiT at the same size) for 150 steps on the two-class
`data.synthetic.two_halves` images (8x8: left half bright or right half bright), once per
variant, then samples the same weights with several samplers, with and without x_0 clipping and
guidance, and prints per setting: the fraction of samples that show the requested class, the
fraction that are clean (|left - right| > 0.5), and the largest |left - right| (the data's is
at most 2; more means samples outside [-1, 1]).

    python scripts/halves_study.py
    python scripts/halves_study.py --variants=quickstart,no_pos --seeds=0,1,2
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIZE = 8
# name -> (config argument, dotted overrides of the :smoke recipe)
VARIANTS = {
    "quickstart": ("smoke", {}),
    "no_pos": ("smoke", {"model.pos_embed": "none"}),
    "learned_pos": ("smoke", {"model.pos_embed": "learned"}),
    "label_002": ("smoke", {"model.label_init_std": 0.02}),
    "dit": ("smoke,model=DiT-S/2", {}),
    "dit_label_002": ("smoke,model=DiT-S/2", {"model.label_init_std": 0.02}),
}
# (sampler, steps, guidance scale or None, clip)
SETTINGS = [
    ("ddpm", 250, None, False),
    ("ddim", 50, None, False),
    ("ddim", 50, None, True),
    ("dpm++2m", 10, None, False),
    ("dpm++2m", 10, None, True),
    ("dpm++2m", 10, 3.0, True),
]

flags.DEFINE_list("variants", list(VARIANTS), f"Of {sorted(VARIANTS)}.")
flags.DEFINE_list("seeds", ["0"], "Config seeds; rows average over them.")
flags.DEFINE_integer("steps", 150, "Training steps (batch 32).")
# docs/quickstart.md's table was measured with eps prediction, before v became the default.
flags.DEFINE_list("set", ["diffusion.prediction=eps"], "Dotted overrides for every variant.")
FLAGS = flags.FLAGS


def run(name: str, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import base, quickstart
    from diffussm_jax import parallel, sampling, training
    from diffussm_jax.data import synthetic

    config_arg, overrides = VARIANTS[name]
    config = quickstart.get_config(config_arg)
    with config.unlocked():
        config.update_from_flattened_dict(
            {
                "data.image_size": SIZE,
                "data.center_crop": None,
                "data.num_classes": 2,
                "global_batch_size": 32,
                "learning_rate": 3e-3,
                "warmup_steps": 20,
                "seed": seed,
                **base.parse_overrides(FLAGS.set),
                **overrides,
            }
        )
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    experiment = training.setup(config, mesh)
    state, step_fn = experiment.init_state(), experiment.train_step()
    images, labels = synthetic.two_halves(32 * FLAGS.steps, SIZE, seed=seed)
    for start in range(0, len(images), 32):
        batch = {"image": jnp.asarray(images[start : start + 32])}
        batch["label"] = jnp.asarray(labels[start : start + 32])
        state, _ = step_fn(state, batch)
    requested = np.repeat(np.arange(2, dtype=np.int32), 16)
    results = {}
    for sampler, steps, cfg_scale, clip in SETTINGS:
        sample_fn = sampling.make_sample_fn(
            experiment.model,
            experiment.diffusion,
            mesh,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            clip_denoised=clip,
        )
        samples = sampling.draw(sample_fn, state.ema_params, jax.random.key(1), requested, mesh)
        statistic = synthetic.left_minus_right(samples)
        results[(sampler, steps, cfg_scale, clip)] = (
            np.mean(np.where(statistic > 0, 0, 1) == requested),
            np.mean(np.abs(statistic) > 0.5),
            np.abs(statistic).max(),
        )
    return results


def main(argv):
    del argv
    seeds = [int(seed) for seed in FLAGS.seeds]
    print(
        f"python scripts/halves_study.py --variants={','.join(FLAGS.variants)} "
        f"--seeds={','.join(FLAGS.seeds)} --steps={FLAGS.steps}  (load {os.getloadavg()[0]:.1f})"
    )
    print("\n| variant | sampler | guidance | x_0 clip | requested class | clean | peak abs(L-R) |")
    print("|---|---|---|---|---|---|---|")
    for name in FLAGS.variants:
        per_seed = [run(name, seed) for seed in seeds]
        for setting in SETTINGS:
            right, clean, peak = np.mean([r[setting] for r in per_seed], axis=0)
            sampler, steps, cfg_scale, clip = setting
            print(
                f"| {name} | {sampler} {steps} | {cfg_scale or 'none'} | {'yes' if clip else 'no'} "
                f"| {right:.0%} | {clean:.0%} | {peak:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
