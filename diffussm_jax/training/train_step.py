"""The train step: diffusion loss, gradients (optionally accumulated), AdamW, EMA, guards."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax.training import sharding
from diffussm_jax.training.train_state import TrainState

Batch = dict[str, jax.Array]
NUM_LOSS_BUCKETS = 4  # loss by quartile of t


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def _loss_and_grads(params, model, diffusion, batch: Batch, rng: jax.Array):
    t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    images = batch["image"]
    labels = batch.get("label")

    def loss_fn(params):
        def model_fn(x, t, y):
            return model.apply(
                {"params": params}, x, t, y, train=True, rngs={"label_dropout": dropout_rng}
            )

        t = diffusion_lib.sample_timesteps(t_rng, images.shape[0], diffusion)
        noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
        terms = diffusion_lib.training_losses(model_fn, diffusion, images, t, noise, labels=labels)
        return terms["loss"].mean(), (terms, t)

    (loss, (terms, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    buckets = diffusion_lib.timestep_bucket_losses(
        terms["loss"], t, diffusion.num_timesteps, NUM_LOSS_BUCKETS
    )
    stats = {
        "loss": loss,
        "mse": terms["mse"].mean(),
        "vb": terms["vb"].mean(),
        "bucket_sum": buckets["sum"],
        "bucket_count": buckets["count"],
    }
    return grads, stats


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    diffusion: diffusion_lib.Diffusion,
    tx: optax.GradientTransformation,
    ema_decay: float,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` ({"image": (B, H, W, C), "label": (B,)}).

    The step's randomness is fold_in(rng, step), so a resumed run draws the same numbers. With
    `grad_accum_steps` > 1 the batch is split into that many micro-batches whose gradients are
    averaged (same result as one big batch up to summation order, less activation memory).
    A non-finite loss or gradient leaves params, EMA and optimizer state unchanged
    (metrics["nonfinite"] = 1); the caller decides whether to stop.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    compute = functools.partial(_loss_and_grads, model=model, diffusion=diffusion)

    if grad_accum_steps == 1:
        grads, stats = compute(state.params, batch=batch, rng=rng)
    else:
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
            batch,
        )

        def accumulate(carry, inputs):
            index, micro_batch = inputs
            grads, stats = compute(
                state.params, batch=micro_batch, rng=jax.random.fold_in(rng, index)
            )
            return jax.tree.map(jnp.add, carry, (grads, stats)), None

        zeros = jax.eval_shape(
            compute, state.params, batch=jax.tree.map(lambda x: x[0], micro), rng=rng
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, stats), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        sums = ("bucket_sum", "bucket_count")
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        stats = {k: v if k in sums else v / grad_accum_steps for k, v in stats.items()}

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(stats["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = ema_update(state.ema_params, params, ema_decay)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        ema_params=keep_if_finite(ema_params, state.ema_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
    )
    metrics = {
        **stats,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state.params),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics


def make_train_step(config, model: nn.Module, diffusion, tx, mesh: Mesh, state_shardings: Any):
    """`train_step` jitted with explicit shardings and the state donated."""
    step = functools.partial(
        train_step,
        model=model,
        diffusion=diffusion,
        tx=tx,
        ema_decay=config.ema_decay,
        grad_accum_steps=config.grad_accum_steps,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
