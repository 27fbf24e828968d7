"""The functions benchmarked: parameters, a batch, the forward pass and train step, compiled.

A train step is forward + backward + one Adam update on an MSE loss: the model's cost without
the diffusion objective, EMA or data pipeline around it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffussm_jax import models
from diffussm_jax.benchmarks.measure import xla_flops
from diffussm_jax.benchmarks.options import Options
from diffussm_jax.benchmarks.specs import ModelSpec


def init_params(spec: ModelSpec, scan_layers: bool) -> Any:
    """float32 parameters. They depend on neither the input size nor the SSM backend, so they
    are initialised once per architecture, at a tiny input size."""
    overrides = tuple((k, v) for k, v in spec.overrides if k != "ssm.backend")
    return _init_architecture(ModelSpec(spec.registry_name, overrides), scan_layers)


@functools.cache
def _init_architecture(spec: ModelSpec, scan_layers: bool) -> Any:
    size = 2 * spec.patch_size if not spec.is_diffussm else 2
    model = spec.build(size, "float32", scan_layers)
    x, t, y = models.example_inputs(model)
    zeros = [jnp.zeros(a.shape, a.dtype) for a in (x, t, y)]
    variables = jax.jit(model.init)(jax.random.key(0), *zeros)
    return nn.meta.unbox(variables)["params"]


def example_batch(model: nn.Module, batch_size: int) -> tuple[jax.Array, ...]:
    """Fixed random (x, t, y, target): x (B, H, W, C), t and y (B,), target (B, H, W, C_out)."""
    rng = np.random.default_rng(0)
    side, channels = model.input_size, model.in_channels
    x = jnp.asarray(rng.normal(size=(batch_size, side, side, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32)
    y = jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32)
    target = jnp.asarray(rng.normal(size=(batch_size, side, side, model.out_channels)), jnp.float32)
    return x, t, y, target


def forward_fn(model: nn.Module) -> Callable[..., jax.Array]:
    """(params, x, t, y) -> the model's output (B, H, W, C_out)."""

    def forward(params, x, t, y):
        return model.apply({"params": params}, x, t, y)

    return forward


def train_step_fn(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """(params, opt_state, x, t, y, target) -> (params, opt_state, loss): MSE, one Adam step."""

    def loss_fn(params, x, t, y, target):
        return jnp.mean((model.apply({"params": params}, x, t, y) - target) ** 2)

    def train_step(params, opt_state, x, t, y, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, t, y, target)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def scanned_step_flops(spec: ModelSpec, kind: str, input_size: int, precision: str, data) -> float:
    """XLA flops of a step whose layers are scanned, data = (x, t, y[, target]).

    XLA counts a loop body once, so the per-layer cost comes from lowering unrolled depth-1 and
    depth-2 models (lowering only, no compile).
    """
    tx = optax.adam(1e-4)

    def flops_at(depth: int) -> float:
        model = spec.build(input_size, precision, False, depth=depth)
        params = models.abstract_params(model)
        if kind == "forward":
            return xla_flops(jax.jit(forward_fn(model)).lower(params, *data))
        opt_state = jax.eval_shape(tx.init, params)
        return xla_flops(jax.jit(train_step_fn(model, tx)).lower(params, opt_state, *data))

    depth = spec.build(input_size, precision, True).depth
    one, two = flops_at(1), flops_at(2)
    return one + (depth - 1) * (two - one)


@dataclasses.dataclass
class Step:
    """A compiled forward pass or train step with its arguments.

    `carry(outputs, args)` gives the next call's arguments (a train step takes the state it
    returned); None where the arguments stay the same.
    """

    model: nn.Module | None
    fn: Callable[..., Any]
    compiled: Any
    args: tuple
    carry: Callable[[Any, tuple], tuple] | None
    compile_s: float


def compile_step(
    spec: ModelSpec, kind: str, input_size: int, batch_size: int, options: Options
) -> Step:
    """Compile `kind` ("forward" or "train") of `spec` at this latent side and batch size."""
    model = spec.build(input_size, options.precision, options.scan_layers)
    params = init_params(spec, options.scan_layers)
    x, t, y, target = example_batch(model, batch_size)
    if kind == "forward":
        fn, args, donate, carry = forward_fn(model), (params, x, t, y), (), None
    else:
        tx = optax.adam(1e-4)
        # Copies, so that donating the train state does not consume the cached parameters.
        args = (jax.tree.map(jnp.copy, params), jax.jit(tx.init)(params), x, t, y, target)
        fn, donate = train_step_fn(model, tx), (0, 1)

        def carry(out, args):
            return (out[0], out[1], *args[2:])

    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return Step(model, fn, compiled, args, carry, time.perf_counter() - start)
