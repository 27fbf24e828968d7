"""Time of S4D kernel generation (`ssm.s4d_kernel`), powers by squaring against exponentials.

    python scripts/kernel_bench.py        # float32, this machine; about 1 minute

One row per shape: the bidirectional SSM of DiffuSSM-S at 32x32 latents (2H = 768 channels,
L = 1024) and of DiffuSSM-XL at 256 px (2H = 2304, L = 1024), N = 64. Forward, and forward
plus backward of a weighted sum, jitted; medians of 10 calls. "exp" swaps in the form the
powers had before: one complex exponential (exp, cos, sin) per element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax import ssm
from diffussm_jax.benchmarks import measure
from diffussm_jax.ssm import kernels

SHAPES = {"DiffuSSM-S, 32x32": (768, 1024), "DiffuSSM-XL, 256 px": (2304, 1024)}
STATE = 64


def exp_powers(log_da, count, stride=1):
    return jnp.exp(log_da[..., None] * (stride * jnp.arange(count)))


def weighted_sum(weights, log_dt, a, c):
    return jnp.sum(weights * ssm.s4d_kernel(log_dt, a, c, weights.shape[1]))


def median_ms(fn, *args) -> float:
    return 1e3 * measure.time_calls(fn, args, repeats=10)["median_seconds"]


def main() -> None:
    squaring = kernels._powers
    print("| shape | powers | forward ms | forward + backward ms |\n|---|---|---|---|")
    for label, (channels, length) in SHAPES.items():
        rng = np.random.default_rng(0)
        log_dt = jnp.asarray(rng.uniform(np.log(1e-3), np.log(1e-1), channels), jnp.float32)
        a = jnp.asarray(
            np.broadcast_to(ssm.s4d_eigenvalues(STATE), (channels, STATE // 2)), jnp.complex64
        )
        c = jnp.asarray(rng.normal(size=a.shape) + 1j * rng.normal(size=a.shape), jnp.complex64)
        weights = jnp.asarray(rng.normal(size=(channels, length)), jnp.float32)
        for name, powers in (("exp", exp_powers), ("squaring", squaring)):
            kernels._powers = powers  # looked up when the functions below are traced
            forward = jax.jit(functools.partial(ssm.s4d_kernel, length=length))
            gradient = jax.jit(jax.grad(functools.partial(weighted_sum, weights), (0, 1, 2)))
            args = (log_dt, a, c)
            print(
                f"| {label} | {name} | {median_ms(forward, *args):.1f} "
                f"| {median_ms(gradient, *args):.1f} |"
            )
        kernels._powers = squaring


if __name__ == "__main__":
    main()
