"""Instruments: time a compiled call, the device's matmul rate, compiled memory, flop counts.

flops    "xla": XLA's cost analysis (HloCostAnalysis) of the compiled step, which counts every
         op (elementwise, FFTs, dots). XLA counts a loop body once, so for scanned layers the
         per-layer cost comes from unrolled lowerings (`steps.scanned_step_flops`).
         "dense": 2 x the multiply-accumulates of the dot_general ops in the traced step
         (complex dots x4), i.e. the matmul work that MFU conventionally counts.
memory   peak = arguments + outputs + temporaries - aliased, from the compiled executable's
         memory_analysis: a prediction made before anything is allocated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np


def time_calls(fn: Callable[..., Any], args: tuple, *, repeats: int) -> dict[str, float]:
    """Seconds per call of a compiled fn: best and median of `repeats` calls after a warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return dict(seconds=min(times), median_seconds=float(np.median(times)))


def matmul_rate(dtype: str, size: int | None = None) -> float:
    """Dense-matmul FLOP/s of device 0: best of 5 (size, size) @ (size, size) products."""
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    timing = time_calls(matmul, (a, a), repeats=5)
    return 2 * size**3 / timing["seconds"]


def memory_stats(compiled: Any) -> dict[str, float]:
    """Predicted peak and temporary bytes (GiB) of a compiled executable."""
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return dict(peak_gib=peak / 2**30, temp_gib=mem.temp_size_in_bytes / 2**30)


def xla_flops(lowered_or_compiled: Any) -> float:
    """FLOPs of every op in a lowered or compiled function, by XLA's cost analysis."""
    cost = lowered_or_compiled.cost_analysis()
    if cost is None and hasattr(lowered_or_compiled, "compile"):
        # Backends without a pre-compilation cost model (XLA:GPU) count FLOPs after compiling.
        cost = lowered_or_compiled.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def _sub_jaxprs(value: Any):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _sub_jaxprs(item)


def _dense_flops_of_jaxpr(jaxpr: Any) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            out = eqn.outvars[0].aval
            macs = math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
            total += 2 * macs * (4 if jnp.issubdtype(lhs.dtype, jnp.complexfloating) else 1)
            continue
        subs = [sub for value in eqn.params.values() for sub in _sub_jaxprs(value)]
        if eqn.primitive.name == "cond":  # one branch runs
            total += max((_dense_flops_of_jaxpr(sub) for sub in subs), default=0.0)
        else:
            repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            total += repeat * sum(_dense_flops_of_jaxpr(sub) for sub in subs)
    return total


def dense_flops(fn: Callable[..., Any], *args: Any) -> float:
    """2 x MACs of every dot_general in fn's jaxpr (scan bodies x length, complex x4)."""
    return _dense_flops_of_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)


def fit_exponent(lengths: Sequence[float], seconds: Sequence[float]) -> float:
    """Slope of log(seconds) against log(length): time ~ L^slope."""
    return float(np.polyfit(np.log(lengths), np.log(seconds), 1)[0])
