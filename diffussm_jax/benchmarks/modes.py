"""The four run modes, each a list of rows, plus the tables beside them.

models      every registry model at 256 and 512 px (latent 32 / 64): parameters and forward
            GMACs (`models.stats`) beside the papers' figures. Abstract: nothing is run.
throughput  forward and train-step (forward + backward + Adam on an MSE loss) images/s and
            achieved FLOP/s, also as a fraction of this machine's dense-matmul rate measured
            in the same run; DiffuSSM (per backend) against DiT at equal width and depth, with
            the ratios of the two side by side (`throughput_ratios`).
scaling     forward and train-step time and peak memory from L = 256 to 16384 tokens, with the
            log-log growth exponent over L = 1024..16384 (`scaling_summary`).
ssm         the SSM backends alone at L = 1024..16384, forward and backward, plus the memory
            of kernel generation (naive Vandermonde vs factored) at D = 1152, L = 4096
            (`kernel_memory`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax import models, ssm
from diffussm_jax.benchmarks.measure import (
    dense_flops,
    fit_exponent,
    matmul_rate,
    memory_stats,
    xla_flops,
)
from diffussm_jax.benchmarks.measurements import (
    Measurement,
    predict_batch_size,
    prepare_model,
    time_all,
    with_context,
)
from diffussm_jax.benchmarks.options import Options, Row
from diffussm_jax.benchmarks.specs import model_specs
from diffussm_jax.benchmarks.steps import Step


def run_models(options: Options) -> list[Row]:
    """Parameters and forward GMACs of registry models at 256 and 512 px, vs the papers.

    The registry names among `options.models`, or every registry model if there are none.
    """
    names = [name for name in options.models if name in models.names()] or models.names()
    rows = []
    for name in names:
        paper = models.PAPER_FIGURES.get(name, {})
        for input_size in options.input_sizes:
            stats = models.stats(
                name, input_size=input_size, in_channels=4, **options.registry_overrides
            )
            resolution = 8 * input_size
            paper_gmacs = paper.get(f"gmacs_{resolution}")
            gmacs = stats["forward_gmacs"]
            breakdown = stats["gmacs_breakdown"]
            row = dict(
                model=name,
                resolution=resolution,
                latent=f"{input_size}x{input_size}x4",
                params_m=stats["params"] / 1e6,
                paper_params_m=paper.get("params_m"),
                gmacs=gmacs,
                paper_gmacs=paper_gmacs,
                gmacs_vs_paper=gmacs / paper_gmacs if paper_gmacs else None,
                ssm_gmacs=breakdown.get("blocks.ssm"),
                dense_formula_gmacs=breakdown.get("blocks.dense_formula"),
            )
            backend = "fft" if name in models.DIFFUSSM_VARIANTS else "-"
            rows.append(with_context(row, options, backend, 1))
    return rows


def run_throughput(options: Options) -> list[Row]:
    """Images/s and achieved FLOP/s of forward and train step, for each model and input size.

    For each (model, input size) the largest batch size predicted to fit the memory cap is
    used (`predict_batch_size`); without `interleave` a batch that fails to allocate falls back
    to the next smaller candidate.
    """
    rate = matmul_rate(models.Precision.parse(options.precision).compute, options.matmul_size)
    kinds = ("train",) if options.train_only else ("forward", "train")
    specs = model_specs(options.models, options.backends, options.width, options.depth)
    measurements: list[Measurement] = []
    for input_size in options.input_sizes:
        for spec in specs:
            candidates = predict_batch_size(spec, input_size, kinds[-1], options)
            for batch_size in candidates:
                prepared = prepare_model(spec, input_size, batch_size, options, kinds)
                if not options.interleave:
                    time_all(prepared, options, rate)
                fits = all(m.row.get("status", "ok") == "ok" for m in prepared)
                if fits or batch_size == candidates[-1]:
                    measurements += prepared
                    break
    if options.interleave:
        time_all(measurements, options, rate)
    return [
        with_context({**m.row, "matmul_tflops": rate / 1e12}, options, m.backend, m.batch_size)
        for m in measurements
    ]


def throughput_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each DiffuSSM row against each DiT row of the same kind and resolution, timed in the
    same run: the ratios of their dense-matmul FLOP/s, of their FLOP/s by XLA's count, and of
    their images/s.

    DiffuSSM does more dense work per image than DiT/2, so the ratios answer different
    questions: how well each turns its matmuls into speed, and which trains faster. The dense
    count leaves out what is not a matmul (DiffuSSM's FFTs, DiT's softmax); XLA's count
    includes them at its own rates (it counts an rfft of n points as 8 n log2(n) flops, about
    three times the usual 2.5 n log2(n)), so the two ratios bracket the FFT convolution's
    price. Rows that did not run ("skipped", "oom") are left out.
    """
    ran = [r for r in rows if r.get("status") == "ok"]
    table = []
    for kind in dict.fromkeys(r["kind"] for r in ran):
        for resolution in dict.fromkeys(r["resolution"] for r in ran):
            same = [r for r in ran if r["kind"] == kind and r["resolution"] == resolution]
            for ours in (r for r in same if r["backend"] != "-"):
                for dit in (r for r in same if r["backend"] == "-"):
                    entry: Row = dict(
                        kind=kind,
                        resolution=resolution,
                        model=ours["model"],
                        baseline=dit["model"],
                        dense_tflops=ours["dense_tflops"],
                        baseline_dense_tflops=dit["dense_tflops"],
                        dense_tflops_ratio=ours["dense_tflops"] / dit["dense_tflops"],
                        images_per_s_ratio=ours["images_per_s"] / dit["images_per_s"],
                    )
                    if ours.get("xla_tflops") and dit.get("xla_tflops"):
                        entry["xla_tflops_ratio"] = ours["xla_tflops"] / dit["xla_tflops"]
                    if "mfu_nominal" in dit:
                        entry["baseline_mfu_nominal"] = dit["mfu_nominal"]
                    table.append(entry)
    return table


def run_scaling(options: Options) -> list[Row]:
    """Forward and train-step time and peak memory against sequence length."""
    specs = model_specs(options.models, options.backends, options.width, options.depth)
    (batch_size,) = options.batch_sizes[:1]
    measurements: list[Measurement] = []
    for spec in specs:
        for input_size in options.input_sizes:
            prepared = prepare_model(spec, input_size, batch_size, options)
            if not options.interleave:
                time_all(prepared, options)
            measurements += prepared
    if options.interleave:
        time_all(measurements, options)
    return [with_context(m.row, options, m.backend, batch_size) for m in measurements]


def scaling_summary(rows: Sequence[Row], fit_range: tuple[int, int]) -> list[Row]:
    """Per model and kind: growth exponent over fit_range, and time at the longest L run."""
    summary = []
    low, high = fit_range
    for model in dict.fromkeys(r["model"] for r in rows):
        for kind in ("forward", "train"):
            done = [r for r in rows if r["model"] == model and r["kind"] == kind]
            ok = [r for r in done if r["status"] == "ok" and low <= r["tokens"] <= high]
            entry: Row = dict(model=model, kind=kind)
            if len(ok) >= 2:
                entry["exponent"] = fit_exponent(
                    [r["tokens"] for r in ok], [r["seconds"] for r in ok]
                )
                entry["fit_tokens"] = f"{ok[0]['tokens']}..{ok[-1]['tokens']}"
            longest = max(done, key=lambda r: r["tokens"], default=None)
            if longest is not None:
                entry["max_tokens"] = longest["tokens"]
                entry["seconds_at_max"] = longest.get("seconds")
                entry["status_at_max"] = longest["status"]
            summary.append(entry)
    return summary


def _bidirectional_steps(width: int, length: int, batch: int, options: Options, backend, chunk):
    """(forward, forward+backward) of one BidirectionalSSM layer, and (params, u (B, L, D))."""
    layer = ssm.BidirectionalSSM(
        width, ssm.SSMSettings(state_size=options.state_size, backend=backend, chunk_size=chunk)
    )
    u = jnp.asarray(np.random.default_rng(0).normal(size=(batch, length, width)), jnp.float32)
    u = u.astype(jnp.dtype(models.Precision.parse(options.precision).compute))
    params = nn.meta.unbox(layer.init(jax.random.key(0), u[:, :8]))["params"]

    def forward(params, u):
        return layer.apply({"params": params}, u)

    def backward(params, u):
        loss = lambda p, u: jnp.sum(forward(p, u).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, u)

    return (forward, backward), (params, u)


def run_ssm(options: Options) -> list[Row]:
    """The bidirectional SSM layer per backend and length: forward and forward+backward."""
    (batch_size,) = options.batch_sizes[:1]
    variants = [
        (backend, chunk)
        for backend in options.backends
        for chunk in (options.chunk_sizes if backend == "chunked" else (None,))
    ]
    measurements = []
    for backend, chunk in variants:
        for length in options.lengths:
            fns, args = _bidirectional_steps(
                options.width, length, batch_size, options, backend, chunk or ssm.DEFAULT_CHUNK_SIZE
            )
            for kind, fn in zip(("forward", "forward+backward"), fns, strict=True):
                start = time.perf_counter()
                compiled = jax.jit(fn).lower(*args).compile()
                step = Step(None, fn, compiled, args, None, time.perf_counter() - start)
                row: Row = dict(
                    layer=f"BidirectionalSSM [{backend}{f', T={chunk}' if chunk else ''}]",
                    kind=kind,
                    tokens=length,
                    width=options.width,
                    state_size=options.state_size,
                    xla_gflop=xla_flops(compiled) / 1e9,
                    dense_gflop=dense_flops(fn, *args) / 1e9,
                    **memory_stats(compiled),
                )
                measurements.append(Measurement(row, step, batch_size, backend))
    time_all(measurements, options)
    return [with_context(m.row, options, m.backend, batch_size) for m in measurements]


def kernel_memory(channels: int = 1152, state_size: int = 64, length: int = 4096) -> list[Row]:
    """Compiled temp memory of kernel generation, naive (H, N/2, L) Vandermonde vs factored."""
    half = state_size // 2
    args = (
        jax.ShapeDtypeStruct((channels,), jnp.float32),
        jax.ShapeDtypeStruct((channels, half), jnp.complex64),
        jax.ShapeDtypeStruct((channels, half), jnp.complex64),
    )
    rows = []
    for name, kernel_fn in (
        ("naive Vandermonde (vandermonde_kernel)", ssm.vandermonde_kernel),
        ("factored (s4d_kernel)", ssm.s4d_kernel),
    ):
        fn = functools.partial(kernel_fn, length=length)
        grad = jax.grad(lambda *p: fn(*p).sum(), argnums=(0, 1, 2))  # noqa: B023
        for kind, f in (("forward", fn), ("forward+backward", grad)):
            compiled = jax.jit(f).lower(*args).compile()
            rows.append(
                dict(
                    kernel=name,
                    kind=kind,
                    channels=channels,
                    state_size=state_size,
                    tokens=length,
                    temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
                    full_tensor_mib=channels * half * length * 8 / 2**20,
                )
            )
    return rows
