"""Measurements: rows in the making, prepared (compiled, counted), then timed together.

time     best (minimum) of up to `repeats` calls after a warm-up call, functions compiled
         ahead of time. The minimum because the machine may be shared: other processes only
         ever add time. By default (`interleave`) all configurations of a run are timed in
         round-robin rounds, so that such load falls on all of them alike; the 1-minute load
         average when the timing ended is recorded beside each row, and every timed call's
         wall-clock start and length in the row's CALL_LOG entry (written to
         `<mode>_calls.csv`), so that calls made while other processes ran can be told apart.
memory   a configuration whose compiled peak is predicted over the cap is not run (status
         "skipped") instead of crashing the machine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from diffussm_jax import models
from diffussm_jax.benchmarks.machine import (
    load_average,
    machine_description,
    memory_cap_bytes,
    nominal_peak,
)
from diffussm_jax.benchmarks.measure import dense_flops, memory_stats, xla_flops
from diffussm_jax.benchmarks.options import Options, Row
from diffussm_jax.benchmarks.specs import ModelSpec
from diffussm_jax.benchmarks.steps import Step, compile_step, scanned_step_flops


@dataclasses.dataclass
class Measurement:
    """A row in the making: its compiled step (None if skipped) and the call times so far."""

    row: Row
    step: Step | None
    batch_size: int
    backend: str
    times: list[float] = dataclasses.field(default_factory=list)
    starts: list[float] = dataclasses.field(default_factory=list)  # time.time() of each call


# The row key under which `time_all` leaves the timed calls, [(start_unix_s, seconds), ...];
# `benchmarks.run` moves them out of the rows into `<mode>_calls.csv`.
CALL_LOG = "call_log"


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
        step = compile_step(spec, kind, input_size, batch_size, options)
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
            flops = scanned_step_flops(spec, kind, input_size, options.precision, data)
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
    wall_start, start = time.time(), time.perf_counter()
    out = jax.block_until_ready(step.compiled(*step.args))
    if not warm_up:
        measurement.times.append(time.perf_counter() - start)
        measurement.starts.append(wall_start)
    if step.carry is not None:  # the next call takes this step's train state
        step.args = step.carry(out, step.args)


def rates_at(row: Row, seconds: float, batch_size: int) -> Row:
    """A row's throughput columns for a step time: images/s (model rows) and TFLOP/s by XLA's
    and by the dense count."""
    rates: Row = dict(
        xla_tflops=row["xla_gflop"] / seconds / 1e3,
        dense_tflops=row["dense_gflop"] / seconds / 1e3,
    )
    if "model" in row:
        rates["images_per_s"] = batch_size / seconds
    return rates


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
        m.row[CALL_LOG] = list(zip(m.starts, m.times, strict=True))
        m.row.update(rates_at(m.row, seconds, m.batch_size))
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
    mem = compile_step(spec, kind, input_size, smallest, options).compiled.memory_analysis()
    fixed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    cap = memory_cap_bytes(options)
    fitting = tuple(b for b in candidates if fixed + mem.temp_size_in_bytes * b / smallest <= cap)
    return fitting or (smallest,)


def with_context(row: Row, options: Options, backend: str, batch_size: int) -> Row:
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
