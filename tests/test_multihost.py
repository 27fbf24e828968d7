"""Multi-process training on this machine: `launch.train` processes joined by jax.distributed,
and elastic resume on another topology.

Two processes with 4 fake CPU devices each (8 global, mesh data=4 x fsdp=2) split the parameters
across processes, so every step needs cross-process (gloo) collectives. The data is one global
example stream (`data.create_global_loader`), whatever the number of processes, so:
  * two processes train the same steps, on the same global batches, as one 8-device process;
  * a checkpoint resumes on another topology (2x4 -> 1x8, 1x8 -> 1x4, 1x8 -> 2x4) with
    identical global batches from the resume step on (each process records a digest of every
    row it feeds, with the row's place in the global batch) and a final state equal to the
    uninterrupted run's within float32 reduction-order roundoff.

Also: unit tests of when `jax.distributed.initialize` is called (flags, SLURM, Open MPI, TPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import quickstart
from diffussm_jax import parallel
from diffussm_jax.data import embedded_digits
from diffussm_jax.parallel import runtime
from diffussm_jax.training import checkpoint, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEPS, TOTAL_STEPS = 3, 6  # checkpoint after step 3, resume to step 6
PHASE_TIMEOUT_S = 300  # per launch; the launched processes are killed when it runs out
# XLA:CPU's LLVM optimisation dominates the compile of the train step on this 2-core machine
# (138 s -> 22 s for the smoke step under load); every run here uses the same flags, so the
# comparison is unaffected.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The first cross-process (gloo) collective waits only 30 s by default for the other process to
# reach it; on a loaded machine one process can finish compiling the step later than that.
COLLECTIVE_TIMEOUT = "--xla_cpu_collective_timeout_seconds=600"
# fsdp=2 everywhere, data takes the rest: (4, 2) on 8 devices, (2, 2) on 4.
MESH = {"mesh.data": -1, "mesh.fsdp": 2}
# Same config everywhere: smoke model, every step logged, a checkpoint at step 3 (and 6), no
# sample grids (their compile would double the test's time; they were checked by hand).
FIELDS = {
    **MESH,
    "log_every_steps": 1,
    "checkpoint_every_steps": FIRST_STEPS,
    "sample_every_steps": 0,
}
RECORD_ENV = "DIFFUSSM_RECORD_BATCHES"  # set: each process records its rows' digests there


# ----------------------------------------------------------------------------- when to initialise


def test_flags_give_an_explicit_plan():
    plan = runtime.plan_initialization("auto", "10.0.0.1:1234", 4, 3, env={}, tpu_vm=False)
    assert plan.kwargs()["coordinator_address"] == "10.0.0.1:1234"
    assert (plan.num_processes, plan.process_id) == (4, 3)


def test_single_machine_without_scheduler_runs_as_one_process():
    assert runtime.plan_initialization("auto", env={}, tpu_vm=False) is None
    # An sbatch shell with one task, or salloc outside srun, is not a multi-process step.
    one_task = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert runtime.plan_initialization("auto", env=one_task, tpu_vm=False) is None


def test_slurm_openmpi_and_tpu_are_auto_detected():
    srun = {
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu[001-002]",
    }
    plan = runtime.plan_initialization("auto", env=srun, tpu_vm=False)
    assert plan is not None and plan.coordinator_address is None and "SLURM" in plan.reason
    mpirun = {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}
    assert "Open MPI" in runtime.plan_initialization("auto", env=mpirun, tpu_vm=False).reason
    assert "TPU" in runtime.plan_initialization("auto", env={}, tpu_vm=True).reason
    assert runtime.plan_initialization("off", env=srun, tpu_vm=True) is None
    assert runtime.plan_initialization("on", env={}, tpu_vm=False) is not None


def test_bad_flags_are_explained():
    with pytest.raises(ValueError, match="also pass --num_processes, --process_id"):
        runtime.plan_initialization("auto", "h:1", env={})
    with pytest.raises(ValueError, match=r"must be in \[0, --num_processes=2\)"):
        runtime.plan_initialization("auto", "h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="host:port"):
        runtime.plan_initialization("auto", "h", 2, 0, env={})
    with pytest.raises(ValueError, match="contradicts"):
        runtime.plan_initialization("off", "h:1", 2, 0, env={})


# ------------------------------------------------------------------------- launching processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], devices: int, logs: list, env=None) -> list[str]:
    """Runs `commands` at once, each with `devices` fake CPU devices; returns their logs.

    Each is started in its own process group; if one fails or the launch runs past
    PHASE_TIMEOUT_S, all groups are killed, so the test never hangs on a stuck collective.
    """
    env = dict(os.environ if env is None else env)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE} {COLLECTIVE_TIMEOUT}"
        ),
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    processes = []
    try:
        for command, path in zip(commands, logs, strict=True):
            with open(path, "w") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while any(p.poll() is None for p in processes):
            failed = [p for p in processes if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [path.read_text() for path in logs]
    for path, p, text in zip(logs, processes, texts, strict=True):
        assert p.returncode == 0, (
            f"{path.name}: exit {p.returncode} (negative: killed after the {PHASE_TIMEOUT_S} s "
            f"limit or because a peer failed); log tail:\n{text[-4000:]}"
        )
    return texts


def train(workdir, data_dir: str, logs, *, processes: int, devices: int, steps: int) -> list[str]:
    """`launch.train` (through this file's recorder) as `processes` processes with `devices`
    CPU devices each; the coordinator is on localhost. Returns the processes' logs."""
    fields = {**FIELDS, "num_train_steps": steps, "data.data_dir": data_dir}
    command = [
        sys.executable,
        __file__,
        "--config=configs/quickstart.py:smoke",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in fields.items()),
    ]
    if processes > 1:
        address = f"127.0.0.1:{_free_port()}"
        command += [
            f"--coordinator_address={address}",
            f"--num_processes={processes}",
            "--initialization_timeout=60",
        ]
    commands = [
        command + ([f"--process_id={index}"] if processes > 1 else []) for index in range(processes)
    ]
    name = os.path.basename(workdir)
    paths = [logs / f"{name}_steps{steps}_process{i}.log" for i in range(processes)]
    env = dict(os.environ, **{RECORD_ENV: str(workdir)})
    return run_processes(commands, devices, paths, env)


def record_main(argv: list[str]) -> None:
    """`launch.train`, with every process recording a digest of each row it feeds to each step,
    keyed by the row's index in the global batch: `<workdir>/batches_process<i>.jsonl`."""
    from absl import app

    from diffussm_jax import data
    from diffussm_jax.training import loop
    from launch import train as train_launcher

    real = loop.global_batch

    def recording(local, config, mesh):
        rows = data.process_rows(
            mesh, config.global_batch_size, jax.sharding.PartitionSpec(parallel.BATCH_AXES)
        )
        digests = {
            int(row): hashlib.sha256(
                local["image"][i].tobytes() + np.int64(local["label"][i]).tobytes()
            ).hexdigest()[:16]
            for i, row in enumerate(rows)
        }
        path = os.path.join(os.environ[RECORD_ENV], f"batches_process{jax.process_index()}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(digests) + "\n")
        return real(local, config, mesh)

    loop.global_batch = recording
    app.run(train_launcher.main, argv=[argv[0], *argv[1:]])


def recorded_batches(workdir, start_step: int) -> dict[int, dict[int, str]]:
    """{step: {global row: digest}} from every process's record, for steps start_step + 1...
    (a launch appends one line per step it trains, beginning after the step it resumed from)."""
    merged: dict[int, dict[int, str]] = {}
    for path in sorted(workdir.glob("batches_process*.jsonl")):
        for offset, line in enumerate(path.read_text().splitlines()):
            rows = {int(row): digest for row, digest in json.loads(line).items()}
            merged.setdefault(start_step + 1 + offset, {}).update(rows)
    return merged


def logged(workdir) -> dict[int, dict[str, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row for row in rows}  # a resumed step's newest record wins


def resume_copy(source, step: int, target) -> None:
    """A new workdir holding `source`'s checkpoint `step` and config (as a run stopped there)."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / str(step), target / "checkpoints" / str(step))
    shutil.copy(source / "config.json", target / "config.json")


def final_state(workdir):
    """The state of `workdir`'s step-6 checkpoint, restored on this process's 8 devices."""
    config = quickstart.get_config("smoke")
    mesh = parallel.create_mesh(4, 2)
    model = train_state.build_model(config)
    tx = train_state.create_optimizer(config)
    abstract = train_state.abstract_train_state(config, model, tx, mesh)[0]
    reader = checkpoint.Checkpointer(str(workdir))
    try:
        state, _ = reader.restore(abstract, step=TOTAL_STEPS)
    finally:
        reader.close()
    return jax.device_get(state)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    # Built once here: two processes building the dataset at the same time would race.
    path = os.environ.get("DIFFUSSM_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    embedded_digits.prepare_embedded_digits(path)
    return path


# ------------------------------------------------------------------------------ two processes


# Same program, same data, same randomness (fold_in(rng, step) on the same global arrays): only
# the order of floating-point reductions differs (gloo across processes vs XLA's in-process
# all-reduce; 4 vs 8 partial sums), which moves float32 results by an ulp or so (observed: 1.5e-7
# relative at most over the 6 steps); 1e-6 leaves room for that to grow and is far below the
# step-to-step change (>1e-2). The early losses barely depend on the images (the
# zero-initialised output layer predicts no noise yet), so grad_norm and param_norm are what
# show that both runs saw the same data: fed another data order, grad_norm at step 2 differs by
# 6e-4 relative.
METRICS_RTOL = 1e-6


def assert_same_metrics(run: dict, reference: dict, steps, what: str) -> None:
    for key in ("loss", "mse", "vb", "grad_norm", "param_norm"):
        np.testing.assert_allclose(
            [run[s][key] for s in steps],
            [reference[s][key] for s in steps],
            rtol=METRICS_RTOL,
            err_msg=f"{what}: {key}",
        )


def test_two_processes_match_one_and_resume_on_other_topologies(tmp_path, data_dir):
    """2x4 trains like 1x8; checkpoints resume 2x4 -> 1x8, 1x8 -> 1x4 and 1x8 -> 2x4 with the
    uninterrupted run's global batches and, within float32 roundoff, its final state."""
    logs = tmp_path / "logs"
    logs.mkdir()
    # The reference: one process, 8 devices, uninterrupted (checkpoints at 3 and 6).
    reference = tmp_path / "one_by_8"
    train(reference, data_dir, logs, processes=1, devices=8, steps=TOTAL_STEPS)
    reference_batches = recorded_batches(reference, 0)
    reference_metrics = logged(reference)
    assert sorted(reference_batches) == list(range(1, TOTAL_STEPS + 1))
    assert all(len(rows) == 16 for rows in reference_batches.values())

    # Two processes x 4 devices train the first 3 steps: same batches, same numbers.
    two = tmp_path / "two_by_4"
    first = train(two, data_dir, logs, processes=2, devices=4, steps=FIRST_STEPS)
    for process_id, text in enumerate(first):
        assert f"process_index={process_id}, process_count=2, local_devices=4" in text
        assert "global_devices=8" in text and "mesh={'data': 4, 'fsdp': 2}" in text
    for step, rows in recorded_batches(two, 0).items():
        assert rows == reference_batches[step], f"2x4 step {step}: another global batch"
    assert_same_metrics(logged(two), reference_metrics, range(1, FIRST_STEPS + 1), "2x4")
    # One data position for the whole job, not one per process.
    position = json.loads(
        (two / "checkpoints" / str(FIRST_STEPS) / checkpoint.DATA_POSITION / "metadata").read_text()
    )
    assert position["examples"] == FIRST_STEPS * 16 and position["process_count"] == 2

    # Each resume starts from a step-3 checkpoint on another topology and trains to step 6.
    resumes = [
        ("2x4 -> 1x8", two, 1, 8),
        ("1x8 -> 1x4", reference, 1, 4),
        ("1x8 -> 2x4", reference, 2, 4),
    ]
    expected_state = final_state(reference)
    for name, source, processes, devices in resumes:
        workdir = tmp_path / name.replace(" -> ", "_to_")
        resume_copy(source, FIRST_STEPS, workdir)
        texts = train(workdir, data_dir, logs, processes=processes, devices=devices, steps=6)
        assert all(f"Restored checkpoint step {FIRST_STEPS}" in text for text in texts), name
        batches = recorded_batches(workdir, FIRST_STEPS)
        assert sorted(batches) == list(range(FIRST_STEPS + 1, TOTAL_STEPS + 1)), name
        for step, rows in batches.items():
            assert rows == reference_batches[step], f"{name}: step {step} got another batch"
        assert_same_metrics(
            logged(workdir), reference_metrics, range(FIRST_STEPS + 1, TOTAL_STEPS + 1), name
        )
        assert_states_close(final_state(workdir), expected_state, name)


def assert_states_close(state, expected, what: str) -> None:
    """Params, EMA and optimizer state equal within float32 reduction-order roundoff.

    Tolerance: the gradients of the two topologies differ by reduction order only (relative
    1e-7 .. 1e-6, METRICS_RTOL on their norm); Adam's update divides the first moment by the
    root of the second, so a relative error e in a gradient entry gives about e relative in
    that entry's update, and the parameter differs by at most 3 steps x lr x e. rtol 1e-5
    relative on every leaf (with atol 1e-7 for entries near 0) is 10x that bound at lr 2e-3,
    and a run fed different batches misses it by orders of magnitude.
    """
    leaves = jax.tree.leaves(state)
    expected_leaves = jax.tree.leaves(expected)
    assert len(leaves) == len(expected_leaves)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
    for name, got, want in zip(names, leaves, expected_leaves, strict=True):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7, err_msg=f"{what}: {name}"
        )


if __name__ == "__main__":
    record_main(sys.argv)
