"""Joining JAX's multi-controller runtime: when to call `jax.distributed.initialize`, and how.

Every process of a multi-host job runs the same program (`python -m launch.train ...`); each one
sees only its own (local) devices until `jax.distributed.initialize` connects it to the others
through a coordinator (process 0). This module decides whether and how to do that:

* explicit flags (`--coordinator_address=host:port --num_processes=N --process_id=i`): anywhere,
  e.g. several processes on one machine, or hosts without a scheduler;
* SLURM (`srun` sets SLURM_NTASKS > 1, SLURM_PROCID, ...): jax's own SLURM detection picks the
  coordinator (first node of the step) and the process ids;
* Open MPI (`mpirun -np N`, OMPI_COMM_WORLD_SIZE > 1): jax's Open MPI detection;
* Cloud TPU VMs (libtpu installed and TPU chips present): jax detects pod workers from the
  TPU metadata server; on a single-host TPU VM that gives one process, which is harmless.

Anything else (a laptop, one GPU host) runs as one process without a coordinator. The decision is
a pure function of the environment and flags (`plan_initialization`) so it can be tested without
a cluster; `initialize` applies it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import socket
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """Arguments for `jax.distributed.initialize`; None fields are auto-detected by jax."""

    reason: str  # why the process joins a multi-process job (for the log)
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300

    def kwargs(self) -> dict[str, object]:
        return {
            "coordinator_address": self.coordinator_address,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "initialization_timeout": self.initialization_timeout,
        }


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "0") or 0)
    except ValueError:
        return 0


def slurm_multiprocess(env: Mapping[str, str]) -> bool:
    """Inside an `srun` step with more than one task (what jax's SLURM detection needs)."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    return all(name in env for name in needed) and _int_env(env, "SLURM_NTASKS") > 1


def ompi_multiprocess(env: Mapping[str, str]) -> bool:
    """Launched by Open MPI's `mpirun` with more than one rank."""
    return "OMPI_MCA_orte_hnp_uri" in env and _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1


def on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are visible (/dev/accel* or /dev/vfio on v5+)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def plan_initialization(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
    initialization_timeout: int = 300,
) -> InitPlan | None:
    """Decides whether this process joins a multi-process job; None = run as one process.

    Args:
      mode: "auto" (flags, else SLURM / Open MPI / Cloud TPU detection), "on" (always call
        `jax.distributed.initialize`, auto-detecting what the flags leave unset) or "off".
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: total number of processes in the job.
      process_id: this process's index in [0, num_processes).
      env: the environment to inspect (default `os.environ`).
      tpu_vm: whether this is a Cloud TPU VM (default: detected by `on_cloud_tpu_vm`).
      initialization_timeout: seconds to wait for all processes to connect.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r}; choose one of {MODES}.")
    env = os.environ if env is None else env
    explicit = (coordinator_address, num_processes, process_id)
    given = [value is not None for value in explicit]
    if mode == "off":
        if any(given):
            raise ValueError(
                "--distributed=off contradicts --coordinator_address/--num_processes/"
                "--process_id; drop those flags or use --distributed=auto."
            )
        return None

    def plan(reason: str) -> InitPlan:
        return InitPlan(reason, *explicit, initialization_timeout=initialization_timeout)

    if any(given):
        if not all(given):
            missing = [
                f"--{name}"
                for name, value in zip(
                    ("coordinator_address", "num_processes", "process_id"), explicit, strict=True
                )
                if value is None
            ]
            raise ValueError(
                f"multi-process flags are incomplete: also pass {', '.join(missing)} (outside "
                "SLURM, Open MPI and Cloud TPU every process needs all three)."
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
            )
        if ":" not in coordinator_address:
            raise ValueError(
                f"--coordinator_address={coordinator_address!r} must be host:port (process 0's "
                "host and a free port, the same on every process)."
            )
        return plan(f"flags: process {process_id} of {num_processes}")
    if mode == "on":
        return plan("--distributed=on (cluster auto-detection)")
    if slurm_multiprocess(env):
        return plan(f"SLURM: {env['SLURM_NTASKS']} tasks")
    if ompi_multiprocess(env):
        return plan(f"Open MPI: {env['OMPI_COMM_WORLD_SIZE']} ranks")
    if on_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
        return plan("Cloud TPU VM (pod workers from the TPU metadata)")
    return None


def initialize(plan: InitPlan | None) -> None:
    """Applies `plan` (calls `jax.distributed.initialize` unless it is None).

    Must run before anything touches a jax backend (jax.devices(), an array, a jit).
    """
    if plan is None:
        logging.debug("Single-process run (no jax.distributed coordinator).")
        return
    logging.info("Initialising jax.distributed (%s).", plan.reason)
    jax.distributed.initialize(**plan.kwargs())


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Blocks until every process has reached the barrier `name` (unique per use).

    Goes through the coordination service rather than a device collective. That matters on CPU:
    the first gloo collective of a program waits only 30 s for the other processes (a hard limit
    in XLA, not changed by --xla_cpu_collective_timeout_seconds), and processes finish compiling
    a train step at different times; a barrier after compiling lines them up.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client has no public accessor

    client = jax_distributed.global_state.client
    if client is None:  # multi-process without jax.distributed (e.g. TPU runtime alone)
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def topology(mesh: jax.sharding.Mesh | None = None) -> dict[str, object]:
    """What this process sees: process index/count, devices, platform and the mesh shape."""
    local = jax.local_devices()
    info: dict[str, object] = {
        "host": socket.gethostname(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": len(local),
        "global_devices": jax.device_count(),
        "platform": local[0].platform,
        "device_kind": local[0].device_kind,
    }
    if mesh is not None:
        info["mesh"] = dict(mesh.shape)
        # Which rows of the global batch this process feeds (its devices' share of the mesh).
        info["mesh_local_devices"] = int(
            sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        )
    return info


def log_topology(mesh: jax.sharding.Mesh | None = None) -> dict[str, object]:
    info = topology(mesh)
    logging.info("Topology: %s", ", ".join(f"{k}={v}" for k, v in info.items()))
    return info


def agree_with_first(flag: bool) -> bool:
    """Process 0's value of `flag`, on every process (e.g. whether a file exists: its view of a
    shared filesystem decides, so that all processes take the same branch)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. one of them received SIGTERM)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
