"""An independent DDPM training loop: the check of our pipeline against one written from scratch.

Nothing of `diffussm_jax.diffusion` or `diffussm_jax.training` is used: the linear schedule, the
noising, the eps-MSE loss, label dropout, the optimizer chain and a DDIM sampler with
classifier-free guidance and x_0 clipping are written out below in a few lines each, after the
DDPM and DDIM papers. The network is `scripts/reference_unet.py`'s UNet and the data are the
quickstart's 16x16 digits; the recipe numbers match `configs/quickstart.py` (batch 64, lr 2e-3
with 50 warmup steps, clipping at norm 1, label dropout 0.1). Compare its rows with
`scripts/digits_sweep.py --variants=unet --samplers=ddim:50:3.0:raw`: same network, same recipe,
our train step and sampler.

    python scripts/reference_ddpm.py --eval_at=10000,20000,30000 --label_init_std=1.0
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

flags.DEFINE_list("eval_at", ["10000", "20000", "30000"], "Images seen at which to sample.")
flags.DEFINE_float("label_init_std", 1.0, "Init scale of the UNet's label table.")
flags.DEFINE_integer("seed", 0, "Seed of init, data order and noise.")
FLAGS = flags.FLAGS

NUM_STEPS = 1000
BATCH, LEARNING_RATE, WARMUP, CLIP, DROP = 64, 2e-3, 50, 1.0, 0.1
NULL = 10  # the label that means "no class"


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import optax
    from reference_unet import ReferenceUNet

    from diffussm_jax import evaluation
    from diffussm_jax.data import embedded_digits, preprocessing

    images, labels = embedded_digits.read_mnist_5k()
    images = np.stack([preprocessing.adm_center_crop(x, 16) for x in images])
    images, labels = preprocessing.to_model_range(images), labels.astype(np.int32)

    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, NUM_STEPS))
    signal = jnp.asarray(np.sqrt(alpha_bar), jnp.float32)
    noise_level = jnp.asarray(np.sqrt(1.0 - alpha_bar), jnp.float32)

    model = ReferenceUNet(16, 1, 10, label_init_std=FLAGS.label_init_std)
    key = jax.random.key(FLAGS.seed)
    params = model.init(key, jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    schedule = optax.linear_schedule(0.0, LEARNING_RATE, WARMUP)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(schedule))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x0, y, key):
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        t = jax.random.randint(t_key, (x0.shape[0],), 0, NUM_STEPS)
        eps = jax.random.normal(noise_key, x0.shape)
        y = jnp.where(jax.random.uniform(drop_key, y.shape) < DROP, NULL, y)
        xt = signal[t, None, None, None] * x0 + noise_level[t, None, None, None] * eps

        def loss_fn(params):
            return jnp.mean(jnp.square(model.apply(params, xt, t, y) - eps))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    times = np.arange(0, NUM_STEPS, NUM_STEPS // 50)[::-1]  # DDIM's 50 steps, stride 20

    @jax.jit
    def sample(params, key, y, scale):
        x = jax.random.normal(key, (y.shape[0], 16, 16, 1))
        for i, t in enumerate(times):
            both = model.apply(
                params,
                jnp.concatenate([x, x]),
                jnp.full((2 * y.shape[0],), t),
                jnp.concatenate([y, jnp.full_like(y, NULL)]),
            )
            cond, uncond = jnp.split(both, 2)
            eps = uncond + scale * (cond - uncond)
            x0 = jnp.clip((x - np.sqrt(1 - alpha_bar[t]) * eps) / np.sqrt(alpha_bar[t]), -1, 1)
            eps = (x - np.sqrt(alpha_bar[t]) * x0) / np.sqrt(1 - alpha_bar[t])
            previous = alpha_bar[times[i + 1]] if i + 1 < len(times) else 1.0
            x = np.sqrt(previous) * x0 + np.sqrt(1 - previous) * eps
        return x

    order_rng = np.random.default_rng(FLAGS.seed)
    order = np.empty(0, np.int64)
    requested = np.repeat(np.arange(10, dtype=np.int32), 20)
    eval_steps = {-(-int(n) // BATCH): int(n) for n in FLAGS.eval_at}
    wall = 0.0
    for step in range(1, max(eval_steps) + 1):
        if len(order) < BATCH:
            order = np.concatenate([order, order_rng.permutation(len(images))])
        index, order = order[:BATCH], order[BATCH:]
        start = time.perf_counter()
        params, opt_state, loss = train_step(
            params, opt_state, images[index], labels[index], jax.random.fold_in(key, step)
        )
        if step in eval_steps:
            loss = float(loss)
        if step > 1:
            wall += time.perf_counter() - start
        if step in eval_steps:
            samples = np.asarray(sample(params, jax.random.key(step), jnp.asarray(requested), 3.0))
            quality = evaluation.digits_quality(samples, requested)
            row = dict(
                trainer="reference_ddpm.py",
                label_init_std=FLAGS.label_init_std,
                seed=FLAGS.seed,
                images=step * BATCH,
                train_wall_s=round(wall, 1),
                mse=round(loss, 4),
                setting="ddim50 g3.0 raw",
                accuracy=quality["accuracy"],
                frechet=round(quality["frechet_distance"], 1),
            )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
