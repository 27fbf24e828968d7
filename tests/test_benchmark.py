"""Benchmark library: flop counting, exponent fit, reports, and a tiny run of every mode."""

import csv
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffussm_jax import benchmarks
from diffussm_jax.benchmarks import machine, measure, modes
from diffussm_jax.benchmarks.specs import model_specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dense_flops_counts_dots_inside_scans_and_complex_dots():
    def f(x, w):
        def body(carry, _):
            return jnp.tanh(carry @ w), None

        return jax.lax.scan(body, x, None, length=3)[0].sum()

    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    assert measure.dense_flops(f, x, w) == 3 * 2 * 4 * 8 * 8
    # The backward pass adds two matmuls per step (d carry and d w).
    assert measure.dense_flops(jax.grad(f, argnums=1), x, w) == 3 * 3 * 2 * 4 * 8 * 8
    z = jnp.ones((4, 8), jnp.complex64)
    assert measure.dense_flops(lambda a, b: a @ b, z, z.T) == 4 * 2 * 4 * 8 * 4


def test_fit_exponent():
    lengths = np.array([1024, 2048, 4096, 16384])
    assert measure.fit_exponent(lengths, 3e-6 * lengths**1.5) == pytest.approx(1.5)


def test_model_specs():
    specs = model_specs(["DiffuSSM", "DiT/1", "DiT-XL/2"], ["fft", "chunked"], 64, 2)
    assert [s.label for s in specs] == [
        "DiffuSSM [fft]",
        "DiffuSSM [chunked]",
        "DiT p1",
        "DiT-XL/2",
    ]
    assert specs[1].backend == "chunked" and specs[2].backend == "-"
    assert specs[0].tokens(32) == 1024 and specs[2].tokens(32) == 1024
    assert specs[3].tokens(32) == 256
    dit = specs[2].build(8, "bfloat16", False)
    assert (dit.hidden_size, dit.depth, dit.num_heads, dit.patch_size) == (64, 2, 1, 1)
    with pytest.raises(ValueError, match="unknown model"):
        model_specs(["Mamba"], ["fft"], 64, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        model_specs(["DiffuSSM"], ["conv"], 64, 2)


def test_kernel_memory_naive_exceeds_factored():
    rows = modes.kernel_memory(channels=16, state_size=8, length=4096)
    temp = {(r["kernel"].split()[0], r["kind"]): r["temp_mib"] for r in rows}
    assert temp[("naive", "forward")] > 4 * temp[("factored", "forward")]


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_report(paths, mode):
    timed = mode != "models"  # the modes that time calls also list each call
    assert {os.path.basename(p) for p in paths.values()} == {
        f"{mode}.{e}" for e in "md csv png".split()
    } | ({f"{mode}_calls.csv"} if timed else set())
    rows = read_csv(paths["csv"])
    assert rows
    for row in rows:
        assert row["machine"].startswith("cpu") and row["command"] == f"test {mode}"
        assert row["precision"] and row["batch"] and row["backend"]
        assert "call_log" not in row
    if timed:  # each timed row's calls: as many as it counts, the fastest its time
        calls = read_csv(paths["calls"])
        for index, row in enumerate(rows):
            mine = [float(c["seconds"]) for c in calls if c["row"] == str(index)]
            if row.get("seconds"):
                assert len(mine) == int(row["calls"]) and min(mine) == float(row["seconds"])
    with open(paths["md"], encoding="utf-8") as f:
        assert f.read().count("\n|") >= len(rows) + 1
    assert os.path.getsize(paths["png"]) > 1000
    return rows


def tiny(mode, tmp_path, **kw):
    return benchmarks.Options(mode=mode, out_dir=str(tmp_path), command=f"test {mode}", **kw)


def test_models_mode(tmp_path):
    options = tiny(
        "models",
        tmp_path,
        models=("DiT-XL/2",),
        input_sizes=(8,),
        registry_overrides=dict(depth=1),
    )
    (row,) = check_report(benchmarks.run(options), "models")
    assert row["model"] == "DiT-XL/2" and row["resolution"] == "64"
    assert float(row["gmacs"]) > 0 and float(row["params_m"]) > 1


def test_throughput_mode(tmp_path):
    options = tiny(
        "throughput",
        tmp_path,
        models=("DiffuSSM", "DiT/2"),
        backends=("chunked",),
        width=16,
        depth=1,
        input_sizes=(8,),
        batch_sizes=(2,),
        repeats=1,
        matmul_size=128,
    )
    rows = check_report(benchmarks.run(options), "throughput")
    assert [(r["model"], r["kind"]) for r in rows] == [
        ("DiffuSSM [chunked]", "forward"),
        ("DiffuSSM [chunked]", "train"),
        ("DiT p2", "forward"),
        ("DiT p2", "train"),
    ]
    for row in rows:
        assert row["status"] == "ok"
        # A train step does more dense work than the forward pass it contains.
        assert float(row["images_per_s"]) > 0 and float(row["dense_gflop"]) > 0
    assert float(rows[1]["dense_gflop"]) > 2 * float(rows[0]["dense_gflop"])
    with open(os.path.join(tmp_path, "throughput.md"), encoding="utf-8") as f:
        assert "## DiffuSSM against DiT, same kind and resolution, same run" in f.read()


def test_throughput_ratios_pair_each_diffussm_row_with_dit_at_its_resolution():
    def row(model, backend, resolution, tflops, images, status="ok", kind="train", **extra):
        return dict(
            model=model,
            backend=backend,
            resolution=resolution,
            kind=kind,
            status=status,
            dense_tflops=tflops,
            images_per_s=images,
            **extra,
        )

    rows = [
        row("DiffuSSM-XL [fft]", "fft", 256, 120.0, 64.0, xla_tflops=130.0),
        row("DiffuSSM-XL [chunked]", "chunked", 256, 0.0, 0.0, status="oom"),
        row("DiT-XL/2", "-", 256, 180.0, 256.0, mfu_nominal=0.18, xla_tflops=200.0),
        row("DiffuSSM-XL [fft]", "fft", 512, 90.0, 9.0),
        row("DiT-XL/2", "-", 512, 150.0, 45.0, mfu_nominal=0.15),
        row("DiT-XL/2", "-", 512, 1.0, 1.0, kind="forward"),  # no DiffuSSM forward to pair
    ]
    table = modes.throughput_ratios(rows)
    assert [(r["model"], r["resolution"]) for r in table] == [
        ("DiffuSSM-XL [fft]", 256),
        ("DiffuSSM-XL [fft]", 512),
    ]
    assert table[0]["dense_tflops_ratio"] == pytest.approx(120 / 180)
    assert table[0]["images_per_s_ratio"] == pytest.approx(0.25)
    assert table[0]["baseline_mfu_nominal"] == 0.18
    assert table[0]["xla_tflops_ratio"] == pytest.approx(0.65)
    assert "xla_tflops_ratio" not in table[1]  # neither 512 px row has XLA's count
    assert table[1]["dense_tflops_ratio"] == pytest.approx(0.6)
    assert table[1]["baseline"] == "DiT-XL/2"


def test_scaling_mode_skips_what_does_not_fit(tmp_path):
    options = tiny(
        "scaling",
        tmp_path,
        models=("DiffuSSM", "DiT/1"),
        backends=("fft",),
        width=16,
        depth=1,
        input_sizes=(8, 32),
        batch_sizes=(1,),
        repeats=1,
        memory_cap_gb=6 / 1024,  # DiT p1 at 1024 tokens is predicted at 8-17 MiB, DiffuSSM 3
        fit_range=(64, 1024),
    )
    rows = check_report(benchmarks.run(options), "scaling")
    status = {(r["model"], r["kind"], r["tokens"]): r["status"] for r in rows}
    assert status[("DiT p1", "train", "1024")].startswith("skipped: predicted")
    assert status[("DiT p1", "train", "64")] == "ok"
    assert status[("DiffuSSM [fft]", "train", "1024")] == "ok"
    summary = modes.scaling_summary(
        [{**r, "tokens": int(r["tokens"]), "seconds": float(r["seconds"] or "nan")} for r in rows],
        (64, 1024),
    )
    assert "exponent" in summary[0]
    with open(os.path.join(tmp_path, "scaling.md"), encoding="utf-8") as f:
        assert "Growth exponents" in f.read()


def test_ssm_mode(tmp_path):
    options = tiny(
        "ssm",
        tmp_path,
        backends=("fft", "chunked"),  # scan's compile is the slowest; same code path
        width=8,
        state_size=8,
        lengths=(24,),
        chunk_sizes=(8,),
        batch_sizes=(1,),
        repeats=1,
        kernel_memory=False,
    )
    rows = check_report(benchmarks.run(options), "ssm")
    assert [(r["layer"], r["kind"]) for r in rows] == [
        ("BidirectionalSSM [fft]", "forward"),
        ("BidirectionalSSM [fft]", "forward+backward"),
        ("BidirectionalSSM [chunked, T=8]", "forward"),
        ("BidirectionalSSM [chunked, T=8]", "forward+backward"),
    ]


def run_script(argv, env, timeout):
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_gpu_bench_script_tiny_cpu_path(tmp_path):
    """scripts/gpu_bench.sh --tiny: the accelerator script's code path (bf16, scanned layers,
    batch search, train step only) at toy sizes on CPU."""
    # LLVM -O0: compiles ~35% faster; this checks the code path, not its speed.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = {**os.environ, "OUT_DIR": str(tmp_path), "PYTHON": sys.executable, "XLA_FLAGS": flags}
    result = run_script(["bash", os.path.join(REPO, "scripts", "gpu_bench.sh"), "--tiny"], env, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| DiffuSSM [chunked] | train |" in result.stdout
    rows = read_csv(os.path.join(tmp_path, "throughput.csv"))
    assert {r["model"] for r in rows} == {"DiffuSSM [chunked]", "DiT p2"}
    for row in rows:
        assert row["status"] == "ok" and row["precision"] == "bfloat16" and row["kind"] == "train"
        assert row["batch"] == "4"  # the largest candidate fits
        assert float(row["xla_gflop"]) > 0


def test_step_memory_script_times_the_step_it_measures():
    """scripts/step_memory.py --time_steps: the compiled memory of two batch sizes, and the
    step at the larger one run for real; timing on a sharded fake-device layout is refused."""
    script = os.path.join(REPO, "scripts", "step_memory.py")
    common = ["--model=DiffuSSM-S", "--depth=1", "--resolution=256", "--batches=1,2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = run_script(
        [sys.executable, script, *common, "--layouts=1x1", "--time_steps=1", "--remat=full"],
        env,
        300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header, _, row = result.stdout.strip().splitlines()[-3:]
    assert header.endswith("| s/step (large) |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "1 x 1"
    assert float(cells[3]) > 0, "two examples need more temporaries than one"
    assert float(cells[-1]) > 0
    refused = run_script(
        [sys.executable, script, *common, "--layouts=1x8", "--time_steps=1"], env, 120
    )
    assert refused.returncode == 2
    assert "--time_steps runs the step for real: use it with --layouts=1x1" in refused.stderr


def test_step_profile_script_sums_the_traced_ops_by_kind():
    """scripts/step_profile.py: a tiny DiffuSSM [fft] step traced; its FFTs, matmuls and
    layout ops are each found and timed, and the slowest ops are listed with their shapes."""
    script = os.path.join(REPO, "scripts", "step_profile.py")
    size = ["--width=16", "--depth=1", "--side=8", "--batch=2", "--steps=1", "--top=5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = run_script([sys.executable, script, *size], env, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    ops, ms = {}, {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("matmul", "fft", "layout", "other", "all ops"):
            ops[cells[0]], ms[cells[0]] = int(cells[1]), float(cells[2])
    assert set(ops) == {"matmul", "fft", "layout", "other", "all ops"}, result.stdout
    # Counted, not timed: a fast host can run this tiny step's layout ops in under 0.005 ms.
    assert min(ops["matmul"], ops["fft"], ops["layout"]) > 0, ops
    assert ops["all ops"] == sum(ops.values()) - ops["all ops"]
    # Five figures each rounded to 0.01 ms: the sum of four and the total differ by <= 0.025.
    assert ms["all ops"] == pytest.approx(sum(ms.values()) - ms["all ops"], abs=0.025)
    assert ms["all ops"] > 0
    assert result.stdout.count("| `") == 5  # the --top ops with their HLO shapes
    unknown = run_script([sys.executable, script, "--model=DiT"], env, 120)
    assert unknown.returncode == 2 and "DiT" in unknown.stderr


def test_layout_ab_polyphase_segment_equals_the_block_in_float64():
    """scripts/layout_ab.py --check: the polyphase, channel-major hourglass segment (its FFT
    convolution assembled from the sub-positions' spectra) gives the block's output and
    gradients to float64 rounding."""
    script = os.path.join(REPO, "scripts", "layout_ab.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = run_script([sys.executable, script, "--check"], env, 300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    error = float(result.stdout.split("largest difference")[1])
    assert error < 1e-10
    bad = run_script([sys.executable, script, "--experiments=polyphase,typo"], env, 60)
    assert bad.returncode == 2 and "unknown experiments ['typo']" in bad.stderr


def test_machine_description_names_the_host_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: AMD  EPYC 7B13\n\n")
    assert machine.cpu_model(str(cpuinfo)) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # no model name (some ARM)
    assert machine.cpu_model(str(cpuinfo)) is None
    assert machine.cpu_model(str(tmp_path / "missing")) is None
    assert machine.machine_description().startswith("cpu (cpu), ")


def _loaded_ratio_module():
    import importlib.util

    path = os.path.join(REPO, "scripts", "loaded_ratio.py")
    spec = importlib.util.spec_from_file_location("loaded_ratio", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loaded_ratio_summary_from_the_processes_csv_files(tmp_path):
    """scripts/loaded_ratio.py: each process's throughput.csv read back, DiffuSSM's dense and
    XLA FLOP/s against DiT's in the same process, and their spread over the processes."""
    from diffussm_jax.benchmarks import report

    script = _loaded_ratio_module()
    entries = []
    for name, ours, dit in (("r1_1", 0.9, 1.0), ("r1_2", 1.1, 1.0), ("r2_1", 1.5, 1.2)):
        rows = [
            dict(model="DiffuSSM [fft]", kind="train", resolution=256, backend="fft", seconds=1.0,
                 images_per_s=8.0, dense_tflops=ours, xla_tflops=2 * ours, status="ok",
                 load_1min=3.5),
            dict(model="DiT p1", kind="train", resolution=256, backend="-", seconds=2.5,
                 images_per_s=3.2, dense_tflops=dit, xla_tflops=dit, status="ok",
                 load_1min=3.5),
        ]  # fmt: skip
        report.write_csv(str(tmp_path / f"{name}.csv"), rows)
        entries += script.process_ratios(name, script.read_rows(str(tmp_path / f"{name}.csv")))
    assert [e["dense_ratio"] for e in entries] == pytest.approx([0.9, 1.1, 1.25])
    assert [e["xla_ratio"] for e in entries] == pytest.approx([1.8, 2.2, 2.5])
    assert entries[0]["seconds"] == 1.0 and entries[0]["baseline_seconds"] == 2.5
    (summary,) = script.summarise(entries)
    assert summary["processes"] == 3 and summary["at_or_above_target"] == 2
    assert (summary["dense_min"], summary["dense_median"], summary["dense_max"]) == pytest.approx(
        (0.9, 1.1, 1.25)
    )
    text = script.markdown(entries, [summary], "python scripts/loaded_ratio.py")
    assert "| 90.0% / 110.0% / 125.0% |" in text and "| 2 of 3 |" in text


def test_loaded_ratio_keeps_only_calls_made_while_the_other_processes_timed():
    """A process's loaded ratio comes from its calls that started and ended inside every other
    process's timing window: here DiT's fastest call (1.5 s) came after the other process
    had stopped timing, so the loaded ratio uses its 2.0 s call, and DiffuSSM's first call,
    made before the other process started timing, is dropped too."""
    script = _loaded_ratio_module()
    rows = [
        dict(model="DiffuSSM [fft]", kind="train", resolution=256, backend="fft", batch=8,
             seconds=0.8, images_per_s=10.0, dense_gflop=40.0, xla_gflop=60.0,
             dense_tflops=0.05, xla_tflops=0.075, status="ok", load_1min=2.0),
        dict(model="DiT p1", kind="train", resolution=256, backend="-", batch=8, seconds=1.5,
             images_per_s=8 / 1.5, dense_gflop=100.0, xla_gflop=100.0, dense_tflops=0.1 / 1.5,
             xla_tflops=0.1 / 1.5, status="ok", load_1min=2.0),
    ]  # fmt: skip
    calls = [
        dict(row=0, start_unix=10.0, seconds=0.7),  # before the other process timed
        dict(row=1, start_unix=11.0, seconds=2.0),
        dict(row=0, start_unix=13.0, seconds=0.8),
        dict(row=1, start_unix=14.0, seconds=1.5),  # ends after the other process's window
    ]
    other = script.timing_window(
        [dict(start_unix=10.5, seconds=1.0), dict(start_unix=13.0, seconds=1.2)]
    )
    assert other == pytest.approx((10.5, 14.2))
    loaded = script.loaded_rows(rows, calls, [other])
    assert [r["seconds"] for r in loaded] == [0.8, 2.0]
    assert [r["loaded_calls"] for r in loaded] == [1, 1]
    (entry,) = script.process_ratios("r1_1", rows, loaded)
    assert entry["dense_ratio"] == pytest.approx((40 / 0.8) / (100 / 1.5))  # all calls: 75%
    assert entry["dense_ratio_loaded"] == pytest.approx((40 / 0.8) / (100 / 2.0))  # 100%
    assert entry["xla_ratio_loaded"] == pytest.approx((60 / 0.8) / (100 / 2.0))
    assert entry["calls_loaded"] == "1 / 1"
    # No call inside the window: the process is counted apart, not as a ratio.
    none = script.loaded_rows(rows, calls, [(20.0, 30.0)])
    (empty,) = script.process_ratios("r1_2", rows, none)
    (summary,) = script.summarise([entry, empty], suffix="_loaded")
    assert (summary["processes"], summary["unloaded"], summary["at_or_above_target"]) == (1, 1, 1)
    text = script.markdown([entry, empty], [summary], "python scripts/loaded_ratio.py")
    assert "| loaded only | 1 (1 without a loaded call) | 100.0% / 100.0% / 100.0% |" in text
    assert "| - | - | - | - | 0 / 0 |" in text


def test_loaded_ratio_script_runs_concurrent_benchmarks(tmp_path):
    """A tiny round of two concurrent benchmark processes end to end; flags after `--` reach
    every process; bad arguments and a benchmark's usage error end with status 2."""
    script = os.path.join(REPO, "scripts", "loaded_ratio.py")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    tiny = ["--width=16", "--depth=1", "--input_sizes=8", "--batch_sizes=2", "--repeats=1"]
    out = tmp_path / "out"
    result = run_script(
        [sys.executable, script, "--rounds=1", f"--out_dir={out}", "--", *tiny], env, 600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    text = (out / "loaded_ratio.md").read_text()
    assert "| round1_1 | DiffuSSM [fft] | DiT p1 | 64 |" in text
    assert "| round1_2 | DiffuSSM [fft] | DiT p1 | 64 |" in text
    with open(out / "round1_2" / "throughput.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["calls"] for row in rows} == {"1"}  # --repeats=1 held
    assert "call_log" not in rows[0]  # the calls go to their own file
    with open(out / "round1_2" / "throughput_calls.csv") as f:
        calls = list(csv.DictReader(f))
    assert [(c["row"], c["model"], c["call"]) for c in calls] == [
        ("0", "DiffuSSM [fft]", "0"),
        ("1", "DiT p1", "0"),
    ]
    assert [float(c["seconds"]) for c in calls] == pytest.approx(
        [float(r["seconds"]) for r in rows]
    )
    assert float(calls[0]["start_unix"]) + float(calls[0]["seconds"]) <= float(
        calls[1]["start_unix"]
    )
    assert "| DiffuSSM [fft] | DiT p1 | 64 | loaded only |" in text
    bad = run_script([sys.executable, script, "--rounds=0"], env, 60)
    assert bad.returncode == 2 and "--rounds=0" in bad.stderr
    typo = run_script(
        [sys.executable, script, "--rounds=1", f"--out_dir={out}", "--", "--modles=DiT/1"],
        env,
        120,
    )
    assert typo.returncode == 2 and "modles" in typo.stderr, typo.stderr[-2000:]
