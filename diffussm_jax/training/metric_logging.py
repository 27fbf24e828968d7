"""What a run records: JSONL metrics, TensorBoard events and throughput.

The console (progress lines, summaries) is `diffussm_jax.console` and `training.summary`; plots
of the metrics are `training.plots`.

TensorBoard files are written by tensorboardX, which needs no TensorFlow. Only process 0 writes.
Every file goes through `diffussm_jax.files`, so the workdir may be a bucket (`gs://...`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np

from diffussm_jax import files


class MetricWriter:
    """Appends scalars to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`.

    Object storage cannot append. There metrics.jsonl is rewritten whole at each `write` from
    this writer's copy of its lines (read once here), and TensorBoard events are written to a
    local staging directory whose event file is uploaded whole after each flush; a new event
    file is started every `EVENTS_PER_FILE_REMOTE` writes so that each upload stays small
    (TensorBoard reads every event file of the directory).
    """

    EVENTS_PER_FILE_REMOTE = 100

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = files.join(workdir, "metrics.jsonl")
        self._tb_dir = files.join(workdir, "tb")
        self._staging: str | None = None  # local event files of a bucket workdir
        self._tb = None
        self._tb_writes = 0
        self._tb_files = 0  # event files this writer has started
        self._lines: list[str] | None = None
        if self.enabled:
            files.makedirs(workdir)
            if files.is_remote(self.path):
                self._lines = (
                    files.read_text(self.path).splitlines() if files.exists(self.path) else []
                )
                self._staging = tempfile.mkdtemp(prefix="diffussm_tb_")

    def _events(self):
        """The open TensorBoard writer; with a bucket workdir, a new event file after
        EVENTS_PER_FILE_REMOTE writes."""
        if self._staging is not None and self._tb_writes >= self.EVENTS_PER_FILE_REMOTE:
            self._close_events()
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # Event files are named by the second they start in: a numbered suffix keeps two
            # files started within one second (a bucket workdir rotates often) from sharing
            # a name, the second upload replacing the first.
            self._tb = SummaryWriter(
                self._staging or self._tb_dir, filename_suffix=f".{self._tb_files}"
            )
            self._tb_files += 1
            self._tb_writes = 0
        self._tb_writes += 1
        return self._tb

    def _flush(self) -> None:
        self._tb.flush()
        self._upload_staged()

    def _close_events(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload_staged(remove=True)
            self._tb = None

    def _upload_staged(self, remove: bool = False) -> None:
        """Uploads the staged event file whole (the only one: closed ones are removed)."""
        if self._staging is None:
            return
        for name in os.listdir(self._staging):
            local = os.path.join(self._staging, name)
            with open(local, "rb") as f:
                files.write_atomically(files.join(self._tb_dir, name), f.read())
            if remove:
                os.remove(local)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        files.append_lines(self.path, [json.dumps({"step": step, **scalars})], cache=self._lines)
        events = self._events()
        for name, value in scalars.items():
            events.add_scalar(name, value, step)
        self._flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: (H, W, C) uint8."""
        if self.enabled:
            self._events().add_image(name, image, step, dataformats="HWC")
            self._flush()

    def close(self) -> None:
        self._close_events()
        if self._staging is not None:
            os.rmdir(self._staging)
            self._staging = None


def summarize(metrics: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Averages per-step metrics over a logging window; loss by quartile of t from sums."""
    out: dict[str, float] = {}
    for key in metrics[0]:
        if key.startswith("bucket_"):
            continue
        values = np.asarray([m[key] for m in metrics], np.float64)
        out[key] = float(values.sum() if key == "nonfinite" else values.mean())
    sums = np.sum([m["bucket_sum"] for m in metrics], axis=0)
    counts = np.sum([m["bucket_count"] for m in metrics], axis=0)
    for i, (total, count) in enumerate(zip(sums, counts, strict=True)):
        if count > 0:
            out[f"loss_t_q{i + 1}"] = float(total / count)
    return out


class Throughput:
    """Images and steps per second between calls of `rates`, for metrics.jsonl."""

    def __init__(self, global_batch_size: int):
        self.global_batch_size = global_batch_size
        self._last: tuple[int, float] | None = None

    def start(self, step: int) -> None:
        """Counts from `step` (call it after the first step, which includes compilation)."""
        self._last = (step, time.perf_counter())

    def rates(self, step: int) -> dict[str, float]:
        """{"steps_per_sec", "images_per_sec"} since the previous call (or `start`); {} when no
        step has passed since then."""
        now = time.perf_counter()
        if self._last is None:
            self._last = (step, now)
        if step <= self._last[0]:
            return {}
        steps = step - self._last[0]
        seconds = max(now - self._last[1], 1e-9)
        self._last = (step, now)
        return {
            "steps_per_sec": steps / seconds,
            "images_per_sec": steps * self.global_batch_size / seconds,
        }
