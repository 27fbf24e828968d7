"""Benchmarks behind `python -m launch.benchmark --mode=models|throughput|scaling|ssm`.

    from diffussm_jax import benchmark
    paths = benchmark.run(benchmark.Options(mode="scaling", out_dir="docs/benchmarks"))

Every mode measures, returns one row (a dict) per measurement, and writes them under
`out_dir` as `<mode>.md` (a markdown table), `<mode>.csv` and `<mode>.png`. Each row records the
machine, SSM backend, dtype, batch and the command that produced it.

  models      every registry model at 256 and 512 px (latent 32 / 64): parameters and forward
              GMACs (`models.stats`) beside the papers' figures. Abstract: nothing is run.
  throughput  forward and train-step (forward + backward + Adam on an MSE loss) images/s and
              achieved FLOP/s, also as a fraction of this machine's dense-matmul rate measured
              in the same run; DiffuSSM (per backend) against DiT at equal width and depth.
  scaling     forward and train-step time and peak memory from L = 256 to 16384 tokens, with the
              log-log growth exponent over L = 1024..16384.
  ssm         the SSM backends alone at L = 1024..16384, forward and backward, plus the memory
              of kernel generation (naive Vandermonde vs factored) at D = 1152, L = 4096.

Conventions, the same for every model:
  time     best (minimum) of up to `repeats` calls after a warm-up call, functions compiled
           ahead of time. The minimum because the machine may be shared: other processes only
           ever add time. By default (`interleave`) all configurations of a run are timed in
           round-robin rounds, so that such load falls on all of them alike; the 1-minute load
           average when the timing ended is recorded beside each row.
  flops    "xla": XLA's cost analysis (HloCostAnalysis) of the compiled step, which counts every
           op (elementwise, FFTs, dots). XLA counts a loop body once, so for scanned layers
           (`scan_layers`) the per-layer cost comes from unrolled depth-1 and depth-2 lowerings.
           "dense": 2 x the multiply-accumulates of the dot_general ops in the traced step
           (complex dots x4), i.e. the matmul work that MFU conventionally counts.
  memory   peak = arguments + outputs + temporaries - aliased, from the compiled executable's
           memory_analysis: a prediction made before anything is allocated, so over-large
           configurations are skipped (status "skipped") instead of crashing the machine.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from diffussm_jax import models, ssm

Row = dict[str, Any]
MODES = ("models", "throughput", "scaling", "ssm")

# Dense bf16 peak (FLOP/s, no sparsity) of accelerators whose MFU is usually quoted against it.
# Matched by substring of jax's device_kind; the measured matmul rate is reported regardless.
NOMINAL_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclasses.dataclass
class Options:
    """Every knob of every mode. Defaults size the CPU runs to minutes on 2 cores."""

    mode: str = "throughput"
    out_dir: str = "docs/benchmarks"
    command: str = ""  # recorded in every row; the launcher passes its command line
    # Models: "DiffuSSM" and "DiT/<patch>" at (width, depth), or registry names ("DiT-XL/2").
    models: Sequence[str] = ("DiffuSSM", "DiT/1", "DiT/2")
    backends: Sequence[str] = ("fft", "chunked")  # expands every DiffuSSM entry
    width: int = 256
    depth: int = 2
    # A named policy ("float32", "bfloat16") or role=dtype pairs (models.precision).
    precision: str = "float32"
    input_sizes: Sequence[int] = (32,)  # latent side; L = input_size ** 2
    batch_sizes: Sequence[int] = (8,)  # descending: the largest that fits is used
    repeats: int = 3
    time_budget_s: float = 30.0  # stop repeating a measurement after this long
    memory_cap_gb: float | None = None  # default: device limit, else 8 GiB on CPU
    scan_layers: bool = False
    train_only: bool = False
    interleave: bool = True  # time all configurations round-robin (shared CPUs); see time_all
    matmul_size: int | None = None  # default 2048 on CPU, 8192 on accelerators
    # ssm mode
    lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384)
    state_size: int = 64
    chunk_sizes: Sequence[int] = (ssm.DEFAULT_CHUNK_SIZE,)
    kernel_memory: bool = True
    # models mode: registry overrides (tests shrink depth)
    registry_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # scaling mode: exponent fitted over this range of L
    fit_range: tuple[int, int] = (1024, 16384)


# ----------------------------------------------------------------------------- machine


def machine_description() -> str:
    """'cpu (cpu), 2 CPU cores' / 'gpu (NVIDIA H100 80GB HBM3), 16 CPU cores'; device 0 is used."""
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores"


def device_memory_limit() -> int | None:
    """Bytes the first device may allocate, or None where jax does not say (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def memory_cap_bytes(options: Options) -> int:
    if options.memory_cap_gb is not None:
        return int(options.memory_cap_gb * 2**30)
    limit = device_memory_limit()
    return int(0.9 * limit) if limit else 8 * 2**30


def nominal_peak(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    if dtype != "bfloat16":
        return None
    for name, peak in NOMINAL_BF16_PEAK.items():
        if name in kind:
            return peak
    return None


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ----------------------------------------------------------------------------- measurement


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


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a registry name plus constructor overrides, and a table label."""

    label: str
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def backend(self) -> str:
        return dict(self.overrides).get("ssm_backend", "-")

    @property
    def is_diffussm(self) -> bool:
        return self.name.startswith("DiffuSSM")

    @property
    def patch_size(self) -> int:
        return dict(self.overrides).get("patch_size") or models.DIT_VARIANTS.get(self.name, {}).get(
            "patch_size", 1
        )

    def tokens(self, input_size: int) -> int:
        """Length of the sequence the token mixer sees: L for DiffuSSM's SSM, T for DiT."""
        return (input_size // (1 if self.is_diffussm else self.patch_size)) ** 2

    def build(self, input_size: int, precision: str, scan_layers: bool, **overrides) -> nn.Module:
        return models.create(
            self.name,
            input_size=input_size,
            in_channels=4,
            num_classes=1000,
            precision=models.Precision.parse(precision),
            scan_layers=scan_layers,
            **{**dict(self.overrides), **overrides},
        )


def model_specs(names: Sequence[str], backends: Sequence[str], width: int, depth: int):
    """'DiffuSSM', 'DiT/<patch>' (at width and depth) or registry names -> ModelSpecs.

    Every DiffuSSM entry is expanded over `backends`. DiT gets 64-channel heads, as DiT-B..XL.
    """
    specs = []
    for name in names:
        if name == "DiffuSSM" or (name.startswith("DiffuSSM-") and name in models.names()):
            size = dict(hidden_size=width, depth=depth) if name == "DiffuSSM" else {}
            registry = "DiffuSSM-S" if name == "DiffuSSM" else name
            for backend in backends:
                if backend not in ssm.BACKENDS:
                    raise ValueError(f"unknown backend {backend!r}; choose from {ssm.BACKENDS}.")
                overrides = tuple({**size, "ssm_backend": backend}.items())
                specs.append(ModelSpec(f"{name} [{backend}]", registry, overrides))
        elif name.startswith("DiT/"):
            patch = int(name.removeprefix("DiT/"))
            overrides = dict(
                hidden_size=width, depth=depth, num_heads=max(1, width // 64), patch_size=patch
            )
            specs.append(ModelSpec(f"DiT p{patch}", "DiT-S/2", tuple(overrides.items())))
        elif name in models.names():
            specs.append(ModelSpec(name, name))
        else:
            raise ValueError(
                f"unknown model {name!r}: use 'DiffuSSM', 'DiT/<patch>' or a registry name "
                f"({', '.join(models.names())})."
            )
    return specs


def _init_params(spec: ModelSpec, scan_layers: bool) -> Any:
    """float32 parameters. They depend on neither the input size nor the SSM backend, so they
    are initialised once per architecture, at a tiny input size."""
    overrides = tuple((k, v) for k, v in spec.overrides if k != "ssm_backend")
    return _init_architecture(dataclasses.replace(spec, label="", overrides=overrides), scan_layers)


@functools.cache
def _init_architecture(spec: ModelSpec, scan_layers: bool) -> Any:
    size = 2 * spec.patch_size if not spec.is_diffussm else 2
    model = spec.build(size, "float32", scan_layers)
    x, t, y = models.example_inputs(model)
    zeros = [jnp.zeros(a.shape, a.dtype) for a in (x, t, y)]
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), *zeros)
    return nn.meta.unbox(variables)["params"]


def _inputs(model: nn.Module, batch_size: int) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    side, channels = model.input_size, model.in_channels
    x = jnp.asarray(rng.normal(size=(batch_size, side, side, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32)
    y = jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32)
    target = jnp.asarray(rng.normal(size=(batch_size, side, side, model.out_channels)), jnp.float32)
    return x, t, y, target


def forward_fn(model: nn.Module) -> Callable[..., jax.Array]:
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


def _scanned_step_flops(spec: ModelSpec, kind: str, input_size: int, precision: str, data) -> float:
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
class _Step:
    """A compiled forward pass or train step with its arguments."""

    model: nn.Module | None
    fn: Callable[..., Any]
    compiled: Any
    args: tuple
    carry: Callable[[Any, tuple], tuple] | None
    compile_s: float


def _compile_step(spec: ModelSpec, kind: str, input_size: int, batch_size: int, options) -> _Step:
    model = spec.build(input_size, options.precision, options.scan_layers)
    params = _init_params(spec, options.scan_layers)
    x, t, y, target = _inputs(model, batch_size)
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
    return _Step(model, fn, compiled, args, carry, time.perf_counter() - start)


@dataclasses.dataclass
class Measurement:
    """A row in the making: its compiled step (None if skipped) and the call times so far."""

    row: Row
    step: _Step | None
    batch_size: int
    backend: str
    times: list[float] = dataclasses.field(default_factory=list)


def prepare_model(
    spec: ModelSpec,
    input_size: int,
    batch_size: int,
    options: Options,
    kinds: Sequence[str] = ("forward", "train"),
) -> list[Measurement]:
    """Compile the forward pass and/or train step of one model; count its flops and memory.

    A kind whose compiled peak memory exceeds the cap gets status "skipped" and no step: it
    is predicted, not run.
    """
    cap = memory_cap_bytes(options)
    measurements = []
    for kind in kinds:
        step = _compile_step(spec, kind, input_size, batch_size, options)
        row: Row = dict(
            model=spec.label,
            kind=kind,
            tokens=spec.tokens(input_size),
            resolution=8 * input_size,
            width=step.model.hidden_size,
            depth=step.model.depth,
            compile_s=step.compile_s,
            **memory_stats(step.compiled),
        )
        if options.scan_layers:
            data = step.args[1:] if kind == "forward" else step.args[2:]
            flops = _scanned_step_flops(spec, kind, input_size, options.precision, data)
            row["xla_gflop"] = flops / 1e9
        else:
            row["xla_gflop"] = xla_flops(step.compiled) / 1e9
        row["dense_gflop"] = dense_flops(step.fn, *step.args) / 1e9
        if row["peak_gib"] * 2**30 > cap:
            row["status"] = f"skipped: predicted {row['peak_gib']:.1f} GiB > cap {cap / 2**30:.1f}"
            step = None
        measurements.append(Measurement(row, step, batch_size, spec.backend))
    return measurements


def _call(measurement: Measurement, warm_up: bool = False) -> None:
    step = measurement.step
    start = time.perf_counter()
    out = jax.block_until_ready(step.compiled(*step.args))
    if not warm_up:
        measurement.times.append(time.perf_counter() - start)
    if step.carry is not None:  # the next call takes this step's train state
        step.args = step.carry(out, step.args)


def time_all(
    measurements: Sequence[Measurement], options: Options, peak_rate: float | None = None
) -> None:
    """Warm up, then time up to `options.repeats` calls of every prepared step; fill the rows.

    With `options.interleave` the calls go round-robin over all steps, so that load from other
    processes on a shared machine falls on every configuration alike rather than on whichever
    ran at that moment; otherwise one step after another, each step's buffers released before
    the next (an accelerator then holds one train state at a time). A step stops being repeated
    once its calls took `time_budget_s`. An allocation failure gives status "oom".
    """
    active = [m for m in measurements if m.step is not None]
    if options.interleave:
        order = [m for _ in range(options.repeats) for m in active]
    else:
        order = [m for m in active for _ in range(options.repeats)]
    for i, m in enumerate(order):
        if m.step is not None and sum(m.times) <= options.time_budget_s:
            try:
                if not m.times:
                    _call(m, warm_up=True)
                _call(m)
            except jax.errors.JaxRuntimeError as error:
                if "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                m.row["status"] = "oom"
                m.step = None
        if not options.interleave and (i + 1 == len(order) or order[i + 1] is not m):
            m.step = None  # free this step's buffers before the next one runs
    for m in measurements:
        if not m.times:
            continue
        seconds = min(m.times)
        m.row.update(seconds=seconds, median_seconds=float(np.median(m.times)), calls=len(m.times))
        if "model" in m.row:
            m.row["images_per_s"] = m.batch_size / seconds
        m.row["xla_tflops"] = m.row["xla_gflop"] / seconds / 1e3
        m.row["dense_tflops"] = m.row["dense_gflop"] / seconds / 1e3
        if peak_rate:
            m.row["dense_frac_of_matmul"] = m.row["dense_tflops"] * 1e12 / peak_rate
            m.row["xla_frac_of_matmul"] = m.row["xla_tflops"] * 1e12 / peak_rate
        nominal = nominal_peak(models.Precision.parse(options.precision).compute)
        if nominal:
            m.row["mfu_nominal"] = m.row["dense_tflops"] * 1e12 / nominal
        m.row.setdefault("status", "ok")
        m.row["load_1min"] = load_average()


def predict_batch_size(
    spec: ModelSpec, input_size: int, kind: str, options: Options
) -> tuple[int, ...]:
    """The candidate batch sizes (descending) worth compiling, largest predicted to fit first.

    Compiling an XL train step takes tens of seconds, so instead of trying every candidate the
    smallest one is compiled and its temporaries scaled linearly with the batch (parameters and
    optimizer state do not grow). Candidates predicted over the cap are dropped; the rest are
    still checked against their own compiled memory by `prepare_model`.
    """
    candidates = tuple(options.batch_sizes)
    if len(candidates) == 1:
        return candidates
    smallest = min(candidates)
    mem = _compile_step(spec, kind, input_size, smallest, options).compiled.memory_analysis()
    fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    cap = memory_cap_bytes(options)
    fitting = tuple(b for b in candidates if fixed + mem.temp_size_in_bytes * b / smallest <= cap)
    return fitting or (smallest,)


def _with_context(row: Row, options: Options, backend: str, batch_size: int) -> Row:
    """The columns every row carries; load_1min is the one recorded when it was timed, if it was."""
    return {
        **row,
        "load_1min": row.get("load_1min", load_average()),
        "machine": machine_description(),
        "backend": backend,
        "precision": models.Precision.parse(options.precision).name,
        "batch": batch_size,
        "command": options.command,
    }


# ----------------------------------------------------------------------------- modes


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
            backend = "fft" if name.startswith("DiffuSSM") else "-"
            rows.append(_with_context(row, options, backend, 1))
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
        _with_context({**m.row, "matmul_tflops": rate / 1e12}, options, m.backend, m.batch_size)
        for m in measurements
    ]


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
    return [_with_context(m.row, options, m.backend, batch_size) for m in measurements]


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
    layer = ssm.BidirectionalSSM(
        width, state_size=options.state_size, backend=backend, chunk_size=chunk
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
                step = _Step(None, fn, compiled, args, None, time.perf_counter() - start)
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
    return [_with_context(m.row, options, m.backend, batch_size) for m in measurements]


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


# ----------------------------------------------------------------------------- reports


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value.startswith("python "):
        return f"`{value}`"
    return str(value)


def markdown_table(rows: Sequence[Row], exclude: Sequence[str] = ()) -> str:
    columns = [c for c in dict.fromkeys(key for row in rows for key in row) if c not in exclude]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str, rows: Sequence[Row]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _plot(mode: str, rows: Sequence[Row], path: str) -> None:
    import matplotlib  # only the report needs it; imported here to keep the module light

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mode == "models":
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        for ax, resolution in zip(axes, sorted({r["resolution"] for r in rows}), strict=False):
            sub = [r for r in rows if r["resolution"] == resolution]
            pos = np.arange(len(sub))
            ax.bar(pos - 0.2, [r["gmacs"] for r in sub], 0.4, label="ours (XLA)")
            ax.bar(pos + 0.2, [r["paper_gmacs"] or 0 for r in sub], 0.4, label="paper")
            ax.set_xticks(pos, [r["model"] for r in sub], rotation=60, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("forward GMACs")
            ax.set_title(f"{resolution} px")
            ax.legend()
    elif mode == "throughput":
        ok = [r for r in rows if r["status"] == "ok"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        labels = [f"{r['model']}\n{r['kind']} {r['resolution']}px b{r['batch']}" for r in ok]
        axes[0].barh(labels, [r["images_per_s"] for r in ok])
        axes[0].set_xlabel("images / s")
        axes[1].barh(labels, [r.get("dense_frac_of_matmul", 0) for r in ok], label="dense")
        axes[1].barh(
            labels, [r.get("xla_frac_of_matmul", 0) for r in ok], alpha=0.4, label="all XLA flops"
        )
        axes[1].set_xlabel("achieved FLOP/s / measured matmul FLOP/s")
        axes[1].legend()
    else:
        key = "layer" if mode == "ssm" else "model"
        kinds = list(dict.fromkeys(r["kind"] for r in rows))
        fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(6 * (len(kinds) + 1), 5))
        for name in dict.fromkeys(r[key] for r in rows):
            for ax, kind in zip(axes, kinds, strict=False):
                ok = [r for r in rows if r[key] == name and r["kind"] == kind and "seconds" in r]
                ax.loglog([r["tokens"] for r in ok], [r["seconds"] for r in ok], "o-", label=name)
                ax.set_title(f"{kind} time")
                ax.set_xlabel("sequence length L (tokens)")
                ax.set_ylabel("seconds")
            mine = [r for r in rows if r[key] == name and r["kind"] == kinds[-1]]
            axes[-1].loglog(
                [r["tokens"] for r in mine], [r["peak_gib"] for r in mine], "o-", label=name
            )
            skipped = [r for r in mine if r.get("status", "ok") != "ok"]
            axes[-1].loglog(
                [r["tokens"] for r in skipped], [r["peak_gib"] for r in skipped], "kx", ms=10
            )
        axes[-1].set_title(f"predicted peak memory ({kinds[-1]}); x = not run")
        axes[-1].set_xlabel("sequence length L (tokens)")
        axes[-1].set_ylabel("GiB")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    options: Options, rows: Sequence[Row], extra_tables: Sequence[tuple[str, list[Row]]] = ()
) -> dict[str, str]:
    """<out_dir>/<mode>.md (tables), .csv (main rows), .png; returns the paths."""
    os.makedirs(options.out_dir, exist_ok=True)
    base = os.path.join(options.out_dir, options.mode)
    paths = dict(md=base + ".md", csv=base + ".csv", png=base + ".png")
    write_csv(paths["csv"], rows)
    _plot(options.mode, rows, paths["png"])
    header = [
        f"# Benchmark: {options.mode}",
        "",
        f"- machine: {machine_description()}; jax {jax.__version__}",
        f"- precision: {models.Precision.parse(options.precision).describe()}",
        f"- command: `{options.command}`",
        f"- written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, 1-min load average at the end "
        f"{load_average():.2f}",
        "",
        f"![{options.mode}]({os.path.basename(paths['png'])})",
        "",
    ]
    body = [markdown_table(rows)]
    for title, table in extra_tables:
        body += ["", f"## {title}", "", markdown_table(table)]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(header + body) + "\n")
    return paths


def run(options: Options) -> dict[str, str]:
    """Run one mode, print its tables and write the report; returns the written paths."""
    if options.mode not in MODES:
        raise ValueError(f"unknown mode {options.mode!r}; choose one of {MODES}.")
    extra: list[tuple[str, list[Row]]] = []
    if options.mode == "models":
        rows = run_models(options)
    elif options.mode == "throughput":
        rows = run_throughput(options)
    elif options.mode == "scaling":
        rows = run_scaling(options)
        extra.append(
            (
                f"Growth exponents (log-log slope over L = {options.fit_range[0]}.."
                f"{options.fit_range[1]})",
                scaling_summary(rows, options.fit_range),
            )
        )
    else:
        rows = run_ssm(options)
        if options.kernel_memory:
            extra.append(("Kernel generation memory (compiled temp)", kernel_memory()))
    # The console gets the context once instead of in every row.
    print(f"machine: {machine_description()}\ncommand: {options.command}\n")
    print(markdown_table(rows, exclude=("machine", "command")))
    for title, table in extra:
        print(f"\n{title}\n{markdown_table(table, exclude=('machine', 'command'))}")
    return write_report(options, rows, extra)
