"""Plots of a run's `metrics.jsonl`, so a person can look at a run rather than read it.

    plots.write(workdir)                           # -> <workdir>/plots/training.png
    python -m launch.plot --workdir=runs/quickstart

One PNG with a panel for each quantity the run logged: the loss, total and per quartile of t
(log scale); the learning rate; the gradient norm; the throughput (img/s); and one panel per
evaluation metric (`eval/...`: in-training FID, the digits accuracy of the sample grids).
The trainer writes it at every sample grid and at the end of a run.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display
needed); in a notebook, `figure(...)` returns a Figure that displays itself.
"""

from __future__ import annotations

import io
import json
import math

import ml_collections
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffussm_jax import files
from diffussm_jax.training import train_state

Series = dict[str, tuple[np.ndarray, np.ndarray]]

QUARTILE_KEYS = tuple(f"loss_t_q{i}" for i in range(1, 5))
# (title, metric keys, y scale): the training panels, in order.
PANELS = (
    ("loss", ("loss", *QUARTILE_KEYS), "log"),
    ("learning rate", ("learning_rate", "ssm_learning_rate"), "linear"),
    ("gradient norm", ("grad_norm",), "linear"),
    ("throughput (img/s)", ("images_per_sec",), "linear"),
)
LABELS = {
    "loss": "all t",
    **{
        key: f"t quartile {i}" + (" (least noise)" if i == 1 else "")
        for i, key in enumerate(QUARTILE_KEYS, 1)
    },
    "learning_rate": "learning rate",
    "ssm_learning_rate": "SSM dynamics",
}
EVAL_TITLES = {
    "eval/grid_digits_accuracy": "sample grid: digits classified as asked",
    "eval/digits_accuracy": "eval samples: digits classified as asked",
    "eval/digits_frechet_distance": "eval samples: Frechet (digits classifier)",
    "eval/fid": "FID",
    "eval/sfid": "sFID",
    "eval/inception_score": "Inception Score",
}
PLOT_NAME = "training.png"


def metrics_path(workdir: str) -> str:
    return files.join(workdir, "metrics.jsonl")


def read_metrics(path: str) -> Series:
    """`metrics.jsonl` -> {name: (steps (K,) int, values (K,) float)}, sorted by step.

    A resumed run re-logs the steps after its last checkpoint: the newest record of a step wins.

    Raises:
      FileNotFoundError: no such file, with a hint that it comes from launch.train.
      ValueError: a line that is not a JSON object with a step, naming the line.
    """
    if not files.exists(path):
        raise FileNotFoundError(
            f"{path} not found: pass the --workdir of a launch.train run (it writes metrics.jsonl)."
        )
    by_name: dict[str, dict[int, float]] = {}
    with files.open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                # A run killed mid-write can leave a torn last line: say which, then stop.
                raise ValueError(f"{path}:{number} is not a metrics record ({error}).") from error
            for name, value in record.items():
                if isinstance(value, int | float):
                    by_name.setdefault(name, {})[step] = float(value)
    series = {}
    for name, values in by_name.items():
        steps = sorted(values)
        series[name] = (np.asarray(steps, np.int64), np.asarray([values[s] for s in steps]))
    return series


def panels(series: Series) -> list[tuple[str, list[str], str]]:
    """The (title, keys, y scale) of each panel that has data, training panels first."""
    chosen = []
    for title, keys, scale in PANELS:
        present = [key for key in keys if key in series]
        if present:
            chosen.append((title, present, scale))
    evals = sorted(name for name in series if name.startswith("eval/") and name != "eval/seconds")
    chosen.extend((EVAL_TITLES.get(name, name), [name], "linear") for name in evals)
    return chosen


def figure(series: Series, title: str = "", columns: int = 3) -> Figure:
    """A figure of `panels(series)`, against training steps.

    Raises:
      ValueError: nothing to plot (no known metric in `series`).
    """
    chosen = panels(series)
    if not chosen:
        raise ValueError(
            f"no plottable metrics among {sorted(series)}; expected e.g. 'loss' from launch.train."
        )
    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    for index, (panel_title, keys, scale) in enumerate(chosen):
        axes = fig.add_subplot(rows, columns, index + 1)
        for key in keys:
            steps, values = series[key]
            # Non-positive values (a zero learning rate at step 0) have no place on a log axis.
            shown = values if scale == "linear" else np.where(values > 0, values, np.nan)
            style = dict(linewidth=2.0) if key == "loss" else dict(linewidth=1.0, alpha=0.8)
            marker = "." if len(steps) < 30 else None  # a few points: show where they are
            axes.plot(steps, shown, label=LABELS.get(key, key), marker=marker, **style)
        if scale == "log" and any(np.any(series[key][1] > 0) for key in keys):
            axes.set_yscale("log")
            # Plain numbers (0.1, not 10^-1); minor ticks get labels only within one decade,
            # where there is no major tick to read.
            plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
            low, high = axes.get_ylim()
            axes.yaxis.set_major_formatter(plain)
            axes.yaxis.set_minor_formatter(plain if high < 10 * low else ticker.NullFormatter())
        if any("accuracy" in key for key in keys):
            axes.set_ylim(0.0, 1.02)
        axes.set_title(panel_title)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if len(keys) > 1:
            axes.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for `IPython.display.Image`, which updates in place)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save(fig: Figure, path: str) -> str:
    """Writes `fig` as a PNG atomically (a reader never sees half a file); returns `path`."""
    files.write_atomically(path, to_png(fig))
    return path


def default_title(workdir: str) -> str:
    """ "<model>, <workdir name>" (the model from the run's config.json, when there is one)."""
    name = files.basename(files.resolve(workdir))
    try:
        with files.open(files.join(workdir, "config.json")) as f:
            saved = train_state.upgrade_saved_config(ml_collections.ConfigDict(json.load(f)))
        return f"{saved['model_name']}, {name}"
    except (OSError, ValueError, KeyError):
        return name


def write(workdir: str, title: str | None = None) -> str:
    """Plots `<workdir>/metrics.jsonl` into `<workdir>/plots/training.png`; returns the path.

    `title`: default `default_title(workdir)`.
    """
    workdir = files.resolve(workdir)
    series = read_metrics(metrics_path(workdir))
    fig = figure(series, title=default_title(workdir) if title is None else title)
    return save(fig, files.join(workdir, "plots", PLOT_NAME))
