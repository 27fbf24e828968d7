"""The train step: diffusion loss, gradients (optionally accumulated), AdamW, EMA, guards."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax import parallel
from diffussm_jax.models import layers
from diffussm_jax.training import train_state
from diffussm_jax.training.train_state import TrainState

Batch = dict[str, jax.Array]
NUM_LOSS_BUCKETS = 4  # loss by quartile of t


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay of the update that makes `step` + 1 updates; with warmup
    min(decay, (1 + step) / (10 + step)).

    The EMA starts at the initial parameters, which a fixed decay d keeps at weight d^n after n
    updates (0.995^300 = 22%): a short run's EMA is then a blend with an untrained model. The
    warmup averages over roughly the last 10% of the run instead until that reaches `decay`
    (from step 1790 for 0.995).
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def all_finite(*trees: Any) -> jax.Array:
    """Scalar bool: every float element of `trees` is finite (no NaN / Inf)."""
    leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _zero_where(keep: jax.Array, tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.where(keep, jnp.zeros_like(x), x), tree)


def draw_randomness(rng: jax.Array, batch: Batch, diffusion, model: nn.Module) -> Batch:
    """Per-example training randomness for the whole batch: t, noise, and label dropout.

    Drawn once per step for the global batch, so splitting the batch into micro-batches
    (gradient accumulation) trains on exactly the same examples as one big batch.
    """
    t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    images = batch["image"]
    out = {
        **batch,
        "t": diffusion_lib.sample_timesteps(t_rng, images.shape[0], diffusion),
        "noise": jax.random.normal(noise_rng, images.shape, jnp.float32),
    }
    if "label" in batch and model.class_dropout_prob > 0:
        # Classifier-free guidance training: the null label (num_classes) replaces some labels.
        out["label"] = layers.drop_labels(
            dropout_rng, batch["label"], model.class_dropout_prob, model.num_classes
        )
    return out


def _loss_and_grads(params, model, diffusion, batch: Batch):
    """Gradients and loss statistics of one (micro-)batch with its randomness drawn."""

    def loss_fn(params):
        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y)

        terms = diffusion_lib.training_losses(
            model_fn, diffusion, batch["image"], batch["t"], batch["noise"], batch.get("label")
        )
        return terms["loss"].mean(), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Gaussian t are steps in [0, N); flow t are times in [0, 1].
    t_range = 1.0 if isinstance(diffusion, diffusion_lib.Flow) else diffusion.num_timesteps
    buckets = diffusion_lib.timestep_bucket_losses(
        terms["loss"], batch["t"], t_range, NUM_LOSS_BUCKETS
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
    diffusion: diffusion_lib.Process,
    optimizer: SkippableOptimizer,
    ema_decay: float,
    ema_warmup: bool = False,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` ({"image": (B, H, W, C), "label": (B,)}).

    The step's randomness is fold_in(rng, step), so a resumed run draws the same numbers. With
    `grad_accum_steps` > 1 the batch is split into that many micro-batches whose gradients are
    averaged: the same update as one big batch up to summation order, with less activation
    memory.

    The state is updated in place. A non-finite loss or gradient norm, a gradient norm whose
    square overflows (it bounds Adam's second moment) or a non-finite learning rate skips the
    update with exact no-ops: params, EMA and optimizer state stay as they were
    (metrics["nonfinite"] = 1; the caller decides whether to stop; `nonfinite_quantity` names
    the cause). Selecting between the old state and a finished new one instead would keep both
    in memory (docs/pod.md: 0.65 GiB per device for DiffuSSM-XL with FSDP 8). An update that
    overflows from finite inputs has replaced the state: metrics["overflowed"] = 1 too, and
    the trainer stops.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = draw_randomness(rng, batch, diffusion, model)
    compute = functools.partial(_loss_and_grads, model=model, diffusion=diffusion)

    if grad_accum_steps == 1:
        grads, stats = compute(state.params, batch=batch)
    else:
        size = batch["image"].shape[0]
        if size % grad_accum_steps:
            raise ValueError(
                f"batch of {size} does not split into grad_accum_steps={grad_accum_steps} "
                "equal micro-batches; make global_batch_size a multiple of it."
            )
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, size // grad_accum_steps, *x.shape[1:]), batch
        )

        def accumulate(carry, micro_batch):
            grads, stats = compute(state.params, batch=micro_batch)
            return jax.tree.map(jnp.add, carry, (grads, stats)), None

        zeros = jax.eval_shape(compute, state.params, batch=jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, stats), _ = jax.lax.scan(accumulate, zeros, micro)
        sums = ("bucket_sum", "bucket_count")
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        stats = {k: v if k in sums else v / grad_accum_steps for k, v in stats.items()}

    grad_norm = optax.tree.norm(grads)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)

    finite = jnp.isfinite(stats["loss"]) & jnp.isfinite(grad_norm)
    finite &= jnp.isfinite(jnp.square(grad_norm)) & optimizer.rates_finite(state.step)
    keep = ~finite
    updates, opt_state = optimizer.build(keep).update(
        _zero_where(keep, grads), state.opt_state, state.params
    )
    params = optax.apply_updates(state.params, _zero_where(keep, updates))
    ema_params = ema_update(state.ema_params, params, jnp.where(keep, 1.0, decay))
    # The step counters (scalars) are the optimizer state's only other leaves.
    opt_state = jax.tree.map(
        lambda n, o: jnp.where(keep, o, n) if n.ndim == 0 else n, opt_state, state.opt_state
    )
    overflowed = ~all_finite(params, opt_state)
    finite &= ~overflowed
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
    )
    metrics = {
        **stats,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state.params),
        "nonfinite": (~finite).astype(jnp.int32),
        "overflowed": overflowed.astype(jnp.int32),
    }
    return new_state, metrics


@dataclasses.dataclass(frozen=True)
class SkippableOptimizer:
    """The optimizer, as the train step needs it to skip an update in place (see `train_step`).

    build(keep): the optimizer, with the same state structure, leaving the state as it is
    where `keep` is True given zero gradients (`train_state.create_optimizer(config, keep)`);
    learning_rates: the groups' rates, floats or schedules of the step.
    """

    build: Callable[[jax.Array], optax.GradientTransformation]
    learning_rates: dict[str, Any]

    def rates_finite(self, step: jax.Array) -> jax.Array:
        rates = [r(step) if callable(r) else r for r in self.learning_rates.values()]
        return jnp.all(jnp.isfinite(jnp.asarray(rates, jnp.float32)))


def nonfinite_quantity(metrics: dict[str, Any]) -> str:
    """Names what made a step non-finite, from its (host) metrics."""
    if metrics.get("overflowed"):
        return "update (finite loss, gradients and learning rates; applied in place)"
    if not np.isfinite(metrics["loss"]):
        return "loss"
    if not np.isfinite(metrics["grad_norm"]):
        return "gradient norm"
    return "updated parameters / optimizer state (finite loss and gradients)"


def abstract_batch(config, mesh: Mesh, global_batch: int | None = None) -> Batch:
    """Shapes, dtypes and shardings of a training batch, for compiling ahead of time."""
    global_batch = global_batch or config.global_batch_size
    size, channels = config.data.image_size, config.data.channels
    split = parallel.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct(
            (global_batch, size, size, channels), jnp.float32, sharding=split
        ),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=split),
    }


def make_train_step(config, model: nn.Module, diffusion, mesh: Mesh, state_shardings: Any):
    """`train_step` jitted with explicit shardings and the state donated; the optimizer is the
    config's (`train_state.create_optimizer`), which must be the one the state was made with."""
    step = functools.partial(
        train_step,
        model=model,
        diffusion=diffusion,
        optimizer=SkippableOptimizer(
            functools.partial(train_state.create_optimizer, config),
            train_state.learning_rates(config),
        ),
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
        grad_accum_steps=config.grad_accum_steps,
    )

    def sharded_step(state, batch):
        # The model's activation constraints (`layers.constrain_batch`) bind to this mesh.
        with (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nn.logical_axis_rules(parallel.ACTIVATION_RULES),
        ):
            return step(state, batch)

    return jax.jit(
        sharded_step,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
