"""Do the labels reach every block early in training? Measured per block, for two label inits.

Trains `configs/quickstart.py` (or a variant) on the embedded digits with the library's train
step, once per label-table init, and at a few steps prints for every adaLN modulation (each
block's and the final layer's):

    class share = RMS over labels y of (m(y) - mean_y' m(y')) / RMS over y of m(y)

where m(y) is the modulation (shift, scale, gate, ...) for label y at t = 500; it depends on t
and y only. 0 means every label gets the same modulation: the block does not see the class.
At the output it prints

    label effect = RMS(eps(x_t, t, y) - eps(x_t, t, null)) / RMS(eps(x_t, t, null) - noise)

on 100 noised training digits (10 per class) at t = 500: how far the true label moves the
prediction, against the error left in it. Both use the raw (not EMA) parameters.

    python scripts/conditioning_reach.py                         # DiffuSSM, inits 0.02 and 1.0
    python scripts/conditioning_reach.py --model=DiT-S/2 --steps=0,50,100,200,400,625
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

flags.DEFINE_string("model", None, "configs/quickstart.py's model argument; unset: DiffuSSM.")
flags.DEFINE_list("label_init_std", ["0.02", "1.0"], "Label-table inits to compare.")
flags.DEFINE_list("steps", ["0", "25", "50", "100", "200", "400", "625"], "Steps to measure at.")
flags.DEFINE_integer("t", 500, "Timestep at which modulations and predictions are compared.")
# The tables in docs/quickstart.md were measured with this recipe, and the label effect above is
# written for a network that predicts eps, so these are the defaults of --set.
flags.DEFINE_list(
    "set",
    ["diffusion.schedule=linear", "diffusion.prediction=eps"],
    "Dotted overrides of configs/quickstart.py (the prediction must stay eps).",
)
FLAGS = flags.FLAGS


def modulations(model, params, t: int) -> dict[str, np.ndarray]:
    """Every adaLN modulation of the model for labels 0..K (K = null) at step t: (K+1, n*D)."""
    import flax
    import jax.numpy as jnp

    from diffussm_jax.models import layers

    labels = jnp.arange(model.num_classes + 1, dtype=jnp.int32)
    x = jnp.zeros((len(labels), model.input_size, model.input_size, model.in_channels))
    _, state = model.apply(
        {"params": params},
        x,
        jnp.full(labels.shape, t, jnp.int32),
        labels,
        capture_intermediates=lambda module, _: isinstance(module, layers.AdaLNModulation),
        mutable=["intermediates"],
    )
    found = {}
    for path, value in flax.traverse_util.flatten_dict(state["intermediates"]).items():
        name = "/".join(p for p in path[:-1] if p != "adaLN_modulation")
        (chunks,) = value
        found[name] = np.concatenate([np.asarray(c) for c in chunks], axis=-1)
    return found


def class_share(modulation: np.ndarray) -> float:
    """(K+1, n*D) with the null label last -> class share over the K real labels."""
    real = modulation[:-1].astype(np.float64)
    spread = np.sqrt(np.mean(np.square(real - real.mean(axis=0))))
    scale = np.sqrt(np.mean(np.square(real)))
    return float(spread / scale) if scale > 0 else 0.0


def run(label_init_std: float, steps: list[int]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from digits_in_memory import digits_for

    from configs import base, quickstart
    from diffussm_jax import diffusion as diffusion_lib
    from diffussm_jax import parallel, training

    config = quickstart.get_config(f"model={FLAGS.model}" if FLAGS.model else None)
    with config.unlocked():
        config.update_from_flattened_dict(base.parse_overrides(FLAGS.set))
        config.model.label_init_std = label_init_std
    if config.diffusion.prediction != "eps":
        raise app.UsageError("the label effect compares eps outputs: keep diffusion.prediction=eps")
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    experiment = training.setup(config, mesh)
    model, state, step_fn = experiment.model, experiment.init_state(), experiment.train_step()
    images, labels = digits_for(config)

    index = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(model.num_classes)])
    x0 = jnp.asarray(images[index])
    t = jnp.full((len(index),), FLAGS.t, jnp.int32)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = diffusion_lib.q_sample(experiment.diffusion, x0, t, noise)
    null = jnp.full((len(index),), model.num_classes, jnp.int32)

    @jax.jit
    def label_effect(params):
        def eps(y):
            return model.apply({"params": params}, x_t, t, y)[..., : x0.shape[-1]]

        uncond = eps(null)
        moved = jnp.sqrt(jnp.mean(jnp.square(eps(jnp.asarray(labels[index])) - uncond)))
        return moved / jnp.sqrt(jnp.mean(jnp.square(uncond - noise)))

    rows, order = [], np.random.default_rng(config.seed).permutation(len(images))
    batch_size, cursor = config.global_batch_size, 0
    for step in range(max(steps) + 1):
        if step in steps:
            found = modulations(model, state.params, FLAGS.t)
            shares = {name: class_share(value) for name, value in found.items()}
            rows.append(
                dict(
                    label_init_std=label_init_std,
                    step=step,
                    images=step * batch_size,
                    shares=shares,
                    label_effect=float(label_effect(state.params)),
                )
            )
            print(rows[-1], flush=True)
        if step == max(steps):
            break
        if cursor + batch_size > len(order):
            order, cursor = np.random.default_rng(config.seed + step).permutation(len(images)), 0
        take = order[cursor : cursor + batch_size]
        cursor += batch_size
        batch = {"image": jnp.asarray(images[take]), "label": jnp.asarray(labels[take])}
        state, _ = step_fn(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    return rows


def main(argv):
    del argv
    steps = sorted(int(s) for s in FLAGS.steps)
    rows = [r for std in FLAGS.label_init_std for r in run(float(std), steps)]
    names = list(rows[0]["shares"])
    print(
        f"\npython scripts/conditioning_reach.py --model={FLAGS.model or 'DiffuSSM-S'} "
        f"--label_init_std={','.join(FLAGS.label_init_std)} --steps={','.join(FLAGS.steps)} "
        f"--t={FLAGS.t}  (class share of each adaLN modulation; label effect at the output)\n"
    )
    print("| label init | step | images | " + " | ".join(names) + " | label effect |")
    print("|---" * (len(names) + 4) + "|")
    for r in rows:
        shares = " | ".join(f"{r['shares'][n]:.3f}" for n in names)
        print(
            f"| {r['label_init_std']} | {r['step']} | {r['images']:,} | {shares} "
            f"| {r['label_effect']:.3f} |"
        )


if __name__ == "__main__":
    app.run(main)
