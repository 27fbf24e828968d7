"""Benchmarks behind `python -m launch.benchmark --mode=models|throughput|scaling|ssm`.

    from diffussm_jax import benchmarks
    paths = benchmarks.run(benchmarks.Options(mode="scaling", out_dir="docs/benchmarks"))

Every mode measures, returns one row (a dict) per measurement, and writes them under
`out_dir` as `<mode>.md` (a markdown table), `<mode>.csv` and `<mode>.png`, and every timed call
(its row, wall-clock start and seconds) as `<mode>_calls.csv`. Each row records the machine,
SSM backend, dtype, batch and the command that produced it. What each mode measures is
in `modes`; how time, flops and memory are measured in `measurements` and `measure`.

  options.py       `Options` (every knob of every mode), `MODES`, `Row`
  machine.py       the machine: description, memory cap, nominal peak FLOP/s, load average
  measure.py       instruments: call timing, matmul rate, compiled memory, XLA and dense flops
  specs.py         what is benchmarked: registry name + overrides (`ModelSpec`), its label
  steps.py         parameters, a batch, the forward pass and train step, compiled
  measurements.py  rows in the making: prepare (compile, count, predict memory), time all
  modes.py         the four modes: models, throughput, scaling, ssm (+ kernel memory)
  report.py        markdown table, csv, plot, and the written report
"""

from __future__ import annotations

from diffussm_jax.benchmarks.machine import machine_description
from diffussm_jax.benchmarks.measurements import CALL_LOG
from diffussm_jax.benchmarks.modes import (
    kernel_memory,
    run_models,
    run_scaling,
    run_ssm,
    run_throughput,
    scaling_summary,
    throughput_ratios,
)
from diffussm_jax.benchmarks.options import MODES, Options, Row
from diffussm_jax.benchmarks.report import markdown_table, write_report


def run(options: Options) -> dict[str, str]:
    """Run one mode, print its tables and write the report; returns the written paths."""
    if options.mode not in MODES:
        raise ValueError(f"unknown mode {options.mode!r}; choose one of {MODES}.")
    extra: list[tuple[str, list[Row]]] = []
    if options.mode == "models":
        rows = run_models(options)
    elif options.mode == "throughput":
        rows = run_throughput(options)
        ratios = throughput_ratios(rows)
        if ratios:
            extra.append(("DiffuSSM against DiT, same kind and resolution, same run", ratios))
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
    calls = call_rows(rows)
    rows = [{k: v for k, v in row.items() if k != CALL_LOG} for row in rows]
    # The console gets the context once instead of in every row.
    print(f"machine: {machine_description()}\ncommand: {options.command}\n")
    print(markdown_table(rows, exclude=("machine", "command")))
    for title, table in extra:
        print(f"\n{title}\n{markdown_table(table, exclude=('machine', 'command'))}")
    return write_report(options, rows, extra, calls)


# The columns that say which configuration a timed call belongs to, where a row has them.
_CALL_KEYS = ("model", "kind", "resolution", "backend", "batch")


def call_rows(rows: list[Row]) -> list[Row]:
    """One row per timed call: the index of its row (in `<mode>.csv`), that row's
    configuration, the call's number, its wall-clock start (Unix seconds) and its seconds."""
    calls = []
    for index, row in enumerate(rows):
        context = {key: row[key] for key in _CALL_KEYS if key in row}
        for number, (start, seconds) in enumerate(row.get(CALL_LOG, ())):
            calls.append(dict(row=index, **context, call=number, start_unix=start, seconds=seconds))
    return calls


__all__ = ["MODES", "Options", "Row", "call_rows", "run"]
