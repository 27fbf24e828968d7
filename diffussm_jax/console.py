"""What a person sees on the console: this project's logs, and progress of long loops.

Launchers call `configure` once (launch/console.py holds the flags):

    console.configure(library_logs=False, interval_s=30.0, bar=None)

By default only this project's INFO logs are shown, as `HH:MM:SS message`. INFO logs of other
libraries (orbax writes 60 lines per checkpoint, tfds, jax, absl internals) are dropped; their
warnings and errors are kept. `library_logs=True` restores absl's handler untouched.

`Progress` reports a loop: a tqdm bar when stderr is a terminal, otherwise one line every
`interval_s` seconds (and the first and last), such as

    step 400/1200 (33%)  loss 0.1234  192 img/s  ETA 4m10s
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time
from collections.abc import Callable

import tqdm
from absl import logging

# Where this project's code lives: records from files under these directories are "ours".
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_DIRECTORIES = tuple(
    os.path.join(_ROOT, name) + os.sep for name in ("diffussm_jax", "launch", "configs", "scripts")
)

# Other libraries' warnings that report what this project asked for, not a problem: orbax warns
# whenever a checkpoint reader is opened read-only, which launch.sample and launch.evaluate do.
EXPECTED_WARNINGS = ("Given directory is read only",)

# Defaults for Progress objects built without explicit settings (set by `configure`).
_settings: dict[str, object] = {"interval_s": 30.0, "bar": None}


class ProjectFilter(std_logging.Filter):
    """Keeps this project's records, and other libraries' warnings and errors (except the
    `EXPECTED_WARNINGS`)."""

    def __init__(self, directories: tuple[str, ...] = OWN_DIRECTORIES):
        super().__init__()
        self.directories = directories

    def filter(self, record: std_logging.LogRecord) -> bool:
        if os.path.abspath(record.pathname).startswith(self.directories):
            return True
        if record.levelno < std_logging.WARNING:
            return False
        return not (
            record.levelno == std_logging.WARNING and str(record.msg).startswith(EXPECTED_WARNINGS)
        )


class ShortFormatter(std_logging.Formatter):
    """`HH:MM:SS message`; warnings and errors say so (`HH:MM:SS WARNING message`)."""

    def format(self, record: std_logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno < std_logging.WARNING else f"{record.levelname} "
        text = f"{stamp} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class ConsoleHandler(std_logging.Handler):
    """Writes records to stderr through `tqdm.write`, so a progress bar on screen stays whole."""

    def emit(self, record: std_logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure(
    *, library_logs: bool = False, interval_s: float = 30.0, bar: bool | None = None
) -> None:
    """Sets up the console of an entry point (after absl has parsed the flags).

    Args:
      library_logs: keep absl's handler and format and every library's INFO logs.
      interval_s: seconds between progress lines (when no bar is shown).
      bar: a tqdm bar instead of lines; None: when stderr is a terminal (and library_logs is
        off).

    Raises:
      ValueError: a non-positive `interval_s`.
    """
    if not interval_s > 0:
        raise ValueError(f"progress interval {interval_s} s; give a positive number of seconds.")
    if library_logs and bar is None:
        bar = False  # absl's handler writes past a bar: lines read better beside its logs
    _settings.update(interval_s=float(interval_s), bar=bar)
    if library_logs:
        return
    # Levels stay as absl's --verbosity set them on the root logger; only the handler changes.
    root = std_logging.getLogger()
    for handler in list(root.handlers):
        if handler is logging.get_absl_handler() or isinstance(handler, ConsoleHandler):
            root.removeHandler(handler)
    handler = ConsoleHandler()
    handler.addFilter(ProjectFilter())
    handler.setFormatter(ShortFormatter())
    root.addHandler(handler)


def format_seconds(seconds: float) -> str:
    """4m10s, 1h05m, 0m03s."""
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    return f"{hours}h{rem // 60:02d}m" if hours else f"{rem // 60}m{rem % 60:02d}s"


def format_rate(per_second: float) -> str:
    """186, 65.6, 0.912: three significant digits, no exponent."""
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.3g}"


def format_values(values: dict[str, float]) -> str:
    """{"loss": 0.12345} -> "loss 0.1235" (4 significant digits)."""
    return "  ".join(f"{name} {value:.4g}" for name, value in values.items())


class Progress:
    """Progress of a loop over `total` units (steps, images), on process 0 of a job.

        progress = Progress(1200, done=0, label="step", items_per_unit=64)
        for step in range(1, 1201):
            ...
            progress.advance(step)              # every unit: moves the bar
            if step % 50 == 0:
                progress.report(step, loss=loss)  # a line, if one is due
        progress.close()

    Rates and the ETA count from the first `advance`, so the first unit (which compiles) is not
    in them. Lines go to the log (INFO); a bar goes to stderr.

    Args:
      total: units in the whole loop (a resumed loop starts at `done`).
      done: units finished before this call.
      label: the unit's name in lines ("step", "sampled").
      items_per_unit: items (images) per unit, for the items/s rate.
      item_name: the items' unit ("img").
      interval_s: seconds between lines; None: `configure`'s setting (30 s by default).
      bar: True / False, or None for `configure`'s setting (None there: stderr is a terminal).
      enabled: False reports nothing (processes other than 0).
      clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        label: str = "step",
        items_per_unit: int = 1,
        item_name: str = "img",
        interval_s: float | None = None,
        bar: bool | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total = int(total)
        self._clock = clock
        self.label = label
        self.items_per_unit = items_per_unit
        self.item_name = item_name
        self.interval_s = float(_settings["interval_s"] if interval_s is None else interval_s)
        self.enabled = enabled
        self.lines: list[str] = []  # every line reported, for summaries and tests
        self._start = clock()
        self._first: tuple[int, float] | None = None  # (done, time) at the first advance
        self._last_line: tuple[int, float] | None = None
        self._last_report: tuple[int, float] | None = None
        self._done = int(done)
        if bar is None:
            bar = _settings["bar"]
        if bar is None:
            bar = sys.stderr.isatty()
        self._bar = None
        if enabled and bar:
            self._bar = tqdm.tqdm(
                total=self.total,
                initial=self._done,
                unit=label,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def advance(self, done: int) -> None:
        """`done` units are finished (cheap: call it every unit)."""
        now = self._clock()
        if self._first is None:
            self._first = (int(done), now)
        if self._bar is not None:
            self._bar.update(int(done) - self._bar.n)
        self._done = int(done)

    def rate(self, since: tuple[int, float] | None = None) -> float | None:
        """Units per second from `since` (default: the first advance) to now; None if no unit
        has finished since."""
        since = since or self._first
        if since is None or self._done <= since[0]:
            return None
        return (self._done - since[0]) / max(self._clock() - since[1], 1e-9)

    def mean_rate(self) -> float | None:
        """Units per second from the first advance to the latest report (the loop's own speed:
        work after the last report, such as a final evaluation, is not in it)."""
        if self._first is None or self._last_report is None:
            return None
        units = self._last_report[0] - self._first[0]
        if units <= 0:
            return None
        return units / max(self._last_report[1] - self._first[1], 1e-9)

    def elapsed(self) -> float:
        """Seconds since this object was built."""
        return self._clock() - self._start

    def report(self, done: int, **values: float) -> str | None:
        """Shows `values` (loss=...) at `done` units; logs a line if the first, the last, or
        `interval_s` after the previous one. Returns the line logged (None if none)."""
        self.advance(done)
        now = self._clock()
        self._last_report = (self._done, now)
        if not self.enabled:
            return None
        # Over the interval since the previous line: the rate now, not the run's average.
        rate = self.rate(self._last_line)
        parts = [format_values(values)] if values else []
        if rate is not None:
            parts.append(f"{format_rate(rate * self.items_per_unit)} {self.item_name}/s")
        if self._bar is not None:
            self._bar.set_postfix_str("  ".join(parts), refresh=False)
            return None
        due = (
            self._last_line is None
            or self._done >= self.total
            or now - self._last_line[1] >= self.interval_s
        )
        if not due:
            return None
        percent = 100.0 * self._done / max(self.total, 1)
        parts.insert(0, f"{self.label} {self._done}/{self.total} ({percent:.0f}%)")
        if rate is not None and self._done < self.total:
            parts.append(f"ETA {format_seconds((self.total - self._done) / rate)}")
        line = "  ".join(parts)
        self._last_line = (self._done, now)
        self.lines.append(line)
        logging.info("%s", line)
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
