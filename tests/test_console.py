"""What a person sees: log filtering, progress lines, the run's summaries, and its plots."""

import json
import logging
import os

import numpy as np
import pytest
from absl import logging as absl_logging

from configs import quickstart
from diffussm_jax import console
from diffussm_jax.inference import score as run_evaluation
from diffussm_jax.training import plots, summary

OURS = os.path.join(console.OWN_DIRECTORIES[0], "training", "loop.py")
THEIRS = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"


def record(pathname: str, level: int, message: str, *args) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, message, args, None)


def test_project_filter_keeps_our_lines_and_only_problems_of_other_libraries():
    keep = console.ProjectFilter().filter
    assert keep(record(OURS, logging.INFO, "step 10/20"))
    assert keep(record(OURS, logging.DEBUG, "shard 1/4"))
    assert not keep(record(THEIRS, logging.INFO, "Saving checkpoint at step %d", 10))
    assert keep(record(THEIRS, logging.WARNING, "Something is off"))
    assert keep(record(THEIRS, logging.ERROR, "Write failed"))
    # A reader opened read-only, as asked: expected, not a problem.
    assert not keep(record(THEIRS, logging.WARNING, "Given directory is read only=%s", "/x"))
    assert keep(record(THEIRS, logging.ERROR, "Given directory is read only=%s", "/x"))


def test_short_format_names_the_level_of_problems_only():
    formatter = console.ShortFormatter()
    info = formatter.format(record(OURS, logging.INFO, "step %d", 10))
    warning = formatter.format(record(OURS, logging.WARNING, "disk %s", "full"))
    assert info.endswith(" step 10") and len(info) == len("12:34:56 step 10")
    assert warning.endswith(" WARNING disk full")


@pytest.fixture
def root_handlers():
    root = logging.getLogger()
    saved = list(root.handlers)
    yield root
    root.handlers[:] = saved
    console.configure()  # back to the default progress settings


def test_configure_replaces_absl_handler_unless_library_logs(root_handlers, capsys):
    absl_handler = absl_logging.get_absl_handler()
    root_handlers.handlers[:] = [absl_handler]
    console.configure(library_logs=True, interval_s=5)
    assert root_handlers.handlers == [absl_handler]
    console.configure(library_logs=False)
    console.configure(library_logs=False)  # twice: still one handler
    (handler,) = root_handlers.handlers
    assert isinstance(handler, console.ConsoleHandler)
    handler.handle(record(OURS, logging.INFO, "ours"))
    handler.handle(record(THEIRS, logging.INFO, "theirs"))
    err = capsys.readouterr().err
    assert "ours" in err and "theirs" not in err
    with pytest.raises(ValueError, match="positive number of seconds"):
        console.configure(interval_s=0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_at_the_interval_with_rate_and_eta(monkeypatch):
    logged = []
    monkeypatch.setattr(console.logging, "info", lambda text, *args: logged.append(text % args))
    clock = FakeClock()
    progress = console.Progress(
        100, label="step", items_per_unit=64, interval_s=30, bar=False, clock=clock
    )
    clock.now = 5.0
    progress.advance(1)  # after the compiling step: rates count from here
    clock.now = 15.0
    # First report: always shown. 49 steps in 10 s = 4.9 steps/s = 313.6 img/s; 50 to go.
    assert progress.report(50, loss=0.123456) == (
        "step 50/100 (50%)  loss 0.1235  314 img/s  ETA 0m10s"
    )
    clock.now = 30.0
    assert progress.report(60, loss=0.1) is None  # 15 s after the last line
    clock.now = 45.5
    line = progress.report(70, loss=0.1)  # due; the rate since the last line: 20 steps in 30.5 s
    assert line == "step 70/100 (70%)  loss 0.1  42 img/s  ETA 0m45s"
    clock.now = 46.0
    assert progress.report(100, loss=0.05) == "step 100/100 (100%)  loss 0.05  3840 img/s"
    assert progress.lines == logged and len(logged) == 3
    assert progress.mean_rate() == pytest.approx(99 / 41.0)
    assert progress.elapsed() == 46.0


def test_progress_reports_nothing_when_disabled_or_drawing_a_bar(monkeypatch):
    logged = []
    monkeypatch.setattr(console.logging, "info", lambda text, *args: logged.append(text))
    quiet = console.Progress(10, enabled=False, bar=False)
    quiet.advance(1)
    assert quiet.report(10, loss=1.0) is None
    bar = console.Progress(10, bar=True)
    bar.advance(1)
    assert bar.report(10, loss=1.0) is None
    bar.close()
    assert logged == []


def test_format_seconds_and_rates():
    assert console.format_seconds(250) == "4m10s"
    assert console.format_seconds(3900) == "1h05m"
    assert console.format_seconds(-3) == "0m00s"
    assert [console.format_rate(r) for r in (1234.4, 65.56, 0.91234)] == ["1234", "65.6", "0.912"]


def test_config_summary_is_five_lines_and_points_to_the_whole_config():
    config = quickstart.get_config("smoke")
    lines = summary.config_lines(
        config,
        num_params=51_906,
        state_bytes_per_device=3 * 2**20,
        mesh_shape={"data": 1, "fsdp": 1},
        devices="1 cpu device",
        start_step=0,
        config_path="/runs/q/config.json",
    )
    assert len(lines) == 5
    assert lines[0].startswith("DiffuSSM-S (depth=2, hidden_size=32") and "0.05M" in lines[0]
    assert "global batch 16 over 1 cpu device (mesh data 1 x fsdp 1); 20 steps" in lines[1]
    assert "lr 0.002" in lines[2] and "v prediction" in lines[2]
    assert "a sample grid every 20 (dpm++2m, 5 steps, guidance 3)" in lines[3]
    assert lines[4] == "full config: /runs/q/config.json"
    resumed = summary.config_lines(
        config,
        num_params=1,
        state_bytes_per_device=1,
        mesh_shape={"data": 1, "fsdp": 1},
        devices="1 cpu device",
        start_step=10,
        config_path="/c.json",
    )
    assert "resuming at step 10 of 20" in resumed[1]


def test_closing_summary_says_where_everything_is():
    outcome = summary.RunOutcome(
        workdir="/runs/q",
        step=1200,
        total_steps=1200,
        seconds=433,
        images_per_second=190.4,
        last_loss=0.0412,
        checkpoint_dir="/runs/q/checkpoints",
        checkpoint_step=1200,
        plot="/runs/q/plots/training.png",
        grid="/runs/q/samples/step_0001200.png",
        grid_accuracy=0.9375,
        grid_size=80,
    )
    lines = summary.closing_lines(outcome)
    assert lines[0] == "Done: step 1200 of 1200 in 7m13s (190 img/s); last loss 0.0412"
    assert "/runs/q/checkpoints (newest: step 1200)" in lines[1]
    assert "tensorboard --logdir /runs/q/tb" in lines[2]
    assert lines[3].endswith("/runs/q/plots/training.png")
    assert lines[4].endswith("step_0001200.png: 93.8% of 80 classified as the requested digit")
    stopped = summary.RunOutcome(
        workdir="/runs/q",
        step=500,
        total_steps=1200,
        seconds=10,
        images_per_second=None,
        last_loss=None,
        checkpoint_dir="/runs/q/checkpoints",
        checkpoint_step=None,
        stopped_early=True,
    )
    lines = summary.closing_lines(stopped)
    assert lines[0].startswith("Stopped at step 500 of 1200") and "resumes" in lines[0]
    assert "(newest: none)" in lines[1] and len(lines) == 3


def write_metrics(path, records):
    with open(path, "w") as f:
        for item in records:
            f.write(json.dumps(item) + "\n")


def test_read_metrics_keeps_the_newest_record_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(
        path,
        [
            {"step": 10, "loss": 1.0, "learning_rate": 0.001},
            {"step": 20, "loss": 0.8},
            {"step": 20, "eval/grid_digits_accuracy": 0.5},
            # A resumed run re-logs step 20 (after the checkpoint at 10), then goes on.
            {"step": 20, "loss": 0.7},
            {"step": 30, "loss": 0.6},
        ],
    )
    series = plots.read_metrics(str(path))
    steps, loss = series["loss"]
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_array_equal(loss, [1.0, 0.7, 0.6])
    assert series["eval/grid_digits_accuracy"][0].tolist() == [20]
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')  # a run killed mid-write
    with pytest.raises(ValueError, match=r"metrics.jsonl:6 is not a metrics record"):
        plots.read_metrics(str(path))
    with pytest.raises(FileNotFoundError, match=r"launch\.train"):
        plots.read_metrics(str(tmp_path / "nowhere.jsonl"))


def test_panels_follow_what_the_run_logged():
    steps = np.arange(1, 4)
    series = {
        name: (steps, np.ones(3))
        for name in ("loss", "loss_t_q1", "grad_norm", "eval/fid", "eval/seconds", "mse")
    }
    chosen = plots.panels(series)
    assert [title for title, _, _ in chosen] == ["loss", "gradient norm", "FID"]
    assert chosen[0] == ("loss", ["loss", "loss_t_q1"], "log")
    with pytest.raises(ValueError, match="no plottable metrics"):
        plots.figure({"mse": (steps, np.ones(3))})


def test_write_draws_every_panel_into_one_png(tmp_path):
    records = []
    for step in range(10, 110, 10):
        records.append(
            {
                "step": step,
                "loss": 1.0 / step,
                **{f"loss_t_q{i}": i / step for i in range(1, 5)},
                "learning_rate": min(step, 50) * 1e-4,
                "grad_norm": 2.0,
                "images_per_sec": 190.0,
            }
        )
    records.append({"step": 100, "eval/grid_digits_accuracy": 0.9})
    write_metrics(tmp_path / "metrics.jsonl", records)
    (tmp_path / "config.json").write_text(json.dumps({"model": "DiffuSSM-S"}))
    path = plots.write(str(tmp_path))
    assert path == str(tmp_path / "plots" / "training.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plots.default_title(str(tmp_path)) == f"DiffuSSM-S, {tmp_path.name}"
    assert len(plots.panels(plots.read_metrics(str(tmp_path / "metrics.jsonl")))) == 5
    assert os.listdir(tmp_path / "plots") == ["training.png"]  # no temporary left behind


def test_evaluation_summary_names_files_and_scores():
    result = {
        "model": "DiffuSSM-S",
        "step": 1200,
        "num_samples": 200,
        "sampler": "dpm++2m",
        "steps": 25,
        "cfg_scale": 3.0,
        "seed": 0,
        "labels": "balanced",
        "samples": "/runs/q/samples/s.npz",
        "grid": "/runs/q/samples/s.png",
        "grid_layout": "column k = class k",
        "scores": "/runs/q/samples/s.json",
        "accuracy": 0.98,
        "held_out_accuracy": 0.972,
        "frechet_distance": 63.84,
        "held_out_frechet_distance": 6.61,
        "fid": 12.345,
    }
    lines = run_evaluation.summary_lines(result)
    assert lines[0] == (
        "Evaluated DiffuSSM-S at step 1200: 200 samples (dpm++2m, 25 steps, guidance 3, "
        "seed 0, balanced labels)"
    )
    assert lines[2] == "  grid     /runs/q/samples/s.png (column k = class k)"
    assert lines[3] == "  scores   /runs/q/samples/s.json"
    assert lines[4].startswith("  digits   98.0% classified as the requested digit (real digits")
    assert "Frechet distance 63.8 (real: 6.6)" in lines[4]
    assert lines[5] == "  ADM      fid 12.35"
