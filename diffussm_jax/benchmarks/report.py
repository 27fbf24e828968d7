"""Reports: rows as a markdown table, a csv and a plot, written under `out_dir` per mode."""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from diffussm_jax import models
from diffussm_jax.benchmarks.machine import load_average, machine_description
from diffussm_jax.benchmarks.options import Options, Row


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value.startswith("python "):
        return f"`{value}`"
    return str(value)


def markdown_table(rows: Sequence[Row], exclude: Sequence[str] = ()) -> str:
    """One column per key seen in any row (first-seen order), `exclude` left out."""
    columns = [c for c in dict.fromkeys(key for row in rows for key in row) if c not in exclude]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str, rows: Sequence[Row]) -> None:
    """Rows as csv, with the columns of `markdown_table`."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _plot(mode: str, rows: Sequence[Row], path: str) -> None:
    """The mode's figure: GMACs vs paper, throughput bars, or time and memory against L."""
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
    options: Options,
    rows: Sequence[Row],
    extra_tables: Sequence[tuple[str, list[Row]]] = (),
    calls: Sequence[Row] = (),
) -> dict[str, str]:
    """<out_dir>/<mode>.md (tables), .csv (main rows), .png, and _calls.csv (`calls`, one row
    per timed call, if any); returns the paths."""
    os.makedirs(options.out_dir, exist_ok=True)
    base = os.path.join(options.out_dir, options.mode)
    paths = dict(md=base + ".md", csv=base + ".csv", png=base + ".png")
    write_csv(paths["csv"], rows)
    if calls:
        paths["calls"] = base + "_calls.csv"
        write_csv(paths["calls"], calls)
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
