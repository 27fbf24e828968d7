"""The training loop: `train(config, workdir)`.

Builds the experiment (`training.setup`: mesh, model, diffusion, optimizer, sharded state);
resumes from the newest checkpoint in `workdir` (state, EMA, optimizer, step and data position;
on any number of processes and devices, see `create_data_iterator`); trains with periodic
metrics, checkpoints (rolling, plus milestones every `keep_every_steps`) and EMA sample grids
(`training.hooks`); on SIGTERM (preemption) saves and returns. `workdir` may be local or a
bucket (`gs://...`): every file goes through `diffussm_jax.files`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffussm_jax import console, data, files, parallel
from diffussm_jax.parallel import runtime
from diffussm_jax.training import (
    checkpoint,
    hooks,
    metric_logging,
    plots,
    summary,
    train_state,
    train_step,
)
from diffussm_jax.training import (
    experiment as experiment_lib,
)


class NonFiniteError(FloatingPointError):
    """Training stopped on a NaN/Inf: a step's loss or gradient (config.nonfinite = "stop"), or
    a train state about to be checkpointed (always; non-finite state is never saved)."""


NONFINITE_POLICIES = ("skip", "stop")


def check_workdir(workdir: str) -> str:
    """Creates `workdir` and proves it is writable, with an error that says what to do.

    Returns the absolute path (a bucket URL such as `gs://bucket/run` is kept as it is).

    Raises:
      checkpoint.UnsupportedCheckpointLocation: an `s3://` workdir (names the ways out).
      PermissionError: the workdir cannot be written.
    """
    workdir = files.resolve(workdir)
    checkpoint.check_location(workdir)
    try:
        files.makedirs(workdir)
        probe = files.join(workdir, f".write_test_{jax.process_index()}")
        files.write_atomically(probe, "ok")
        files.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir} is not writable ({e.strerror or e}); pass a --workdir you can "
            "write to."
        ) from e
    return workdir


def create_data_iterator(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, start: int = 0
):
    """This process's batches of the global example stream, from stream position `start`.

    The stream does not depend on the topology (`data.create_global_loader`): each process
    reads the rows of global batch k that its devices of `mesh` hold, so a run resumed on
    another number of processes or devices sees the same global batches. `mesh` may be None
    on one process (all rows).
    """
    global_batch_size = config.global_batch_size
    if mesh is not None:
        rows = data.process_rows(
            mesh, global_batch_size, jax.sharding.PartitionSpec(parallel.BATCH_AXES)
        )
    elif jax.process_count() == 1:
        rows = np.arange(global_batch_size)
    else:
        raise ValueError("create_data_iterator needs the mesh when running on several processes.")
    loader = data.create_global_loader(
        config.data.name,
        split=config.data.split,
        data_dir=config.data.data_dir,
        global_batch_size=global_batch_size,
        rows=rows,
        start=start,
        seed=config.seed,
        image_key=config.data.image_key,
        label_key=config.data.label_key,
        center_crop=config.data.center_crop,
        random_flip=config.data.random_flip,
        worker_count=config.data.worker_count,
    )
    return iter(loader)


def resume_position(
    config: ml_collections.ConfigDict, saved: dict[str, int] | None, step: int
) -> int:
    """The stream position to resume from: the saved one, or for checkpoints written before it
    was saved (they hold one grain state per process), `step` global batches in."""
    if saved is None:
        position = step * config.global_batch_size
        logging.warning(
            "Checkpoint step %d has no global data position (written by an older version, with "
            "one data state per process); continuing the global example stream at %d examples "
            "(step x global_batch_size).",
            step,
            position,
        )
        return position
    if (saved["process_count"], saved["device_count"]) != (
        jax.process_count(),
        jax.device_count(),
    ):
        logging.info(
            "Resuming a run checkpointed on %d process(es) x %d device(s) as %d x %d: the same "
            "global batches from example %d on.",
            saved["process_count"],
            saved["device_count"] // saved["process_count"],
            jax.process_count(),
            jax.local_device_count(),
            saved["examples"],
        )
    return int(saved["examples"])


def data_position(config: ml_collections.ConfigDict, examples: int) -> dict[str, int]:
    """What a checkpoint records of the data: the examples of the global stream consumed, and
    the topology and batch that consumed them (for the logs of a resumed run)."""
    return {
        "examples": int(examples),
        "global_batch_size": int(config.global_batch_size),
        "seed": int(config.seed),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }


def check_batch_fits(config: ml_collections.ConfigDict, mesh, checkpointer) -> None:
    """`parallel.check_global_batch`, saying what to do when a checkpointed run is resumed on a
    device count that its global batch does not divide."""
    try:
        parallel.check_global_batch(config.global_batch_size, mesh)
    except ValueError as error:
        steps = checkpointer.all_steps()
        if not steps:
            raise
        raise ValueError(
            f"{error} This workdir holds checkpoints (steps {steps}), which restore on any "
            "device count: resume on a device count that divides "
            f"{config.global_batch_size} (the run's global batch; keeping it keeps the run's "
            "example order), or pass a --config.global_batch_size that this one divides."
        ) from error


def global_batch(local: dict[str, np.ndarray], config, mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays; validates shapes and labels on the way."""
    images = local["image"]
    expected = (config.data.image_size, config.data.image_size, config.data.channels)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"dataset {config.data.name!r} yields images of shape {images.shape[1:]}, the config "
            f"expects {expected}; set config.data.image_size / channels (or center_crop) to match."
        )
    if config.data.latent_scale:
        local = {**local, "image": images * np.float32(config.data.latent_scale)}
    if config.data.num_classes > 0:
        labels = local.get("label")
        if labels is None:
            raise ValueError(
                f"config.data.num_classes={config.data.num_classes} but the dataset has no "
                "labels; set config.data.num_classes=0 for unconditional training."
            )
        if labels.min() < 0 or labels.max() >= config.data.num_classes:
            raise ValueError(
                f"labels out of range [0, {config.data.num_classes}): found {labels.min()}.."
                f"{labels.max()}; set config.data.num_classes to the dataset's class count."
            )
    else:
        local = {k: v for k, v in local.items() if k != "label"}
    return data.make_global_batch(local, mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))


class _StopSignal:
    """Turns SIGTERM into a flag the loop checks after each step (then save and exit)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: will save a checkpoint and exit after this step.")
        self.requested = True

    def agreed(self) -> bool:
        """True on every process if any process was asked to stop."""
        return parallel.any_process(self.requested)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state."""
    workdir = check_workdir(workdir)
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"config.nonfinite={config.nonfinite!r}; choose one of {NONFINITE_POLICIES}: 'skip' "
            "drops a step with a NaN/Inf loss or gradient, 'stop' ends training there."
        )
    experiment = experiment_lib.setup(config)
    mesh = experiment.mesh
    checkpointer = checkpoint.Checkpointer(
        workdir,
        keep=config.keep_checkpoints,
        keep_every_steps=config.keep_every_steps,
        owner=True,
    )
    check_batch_fits(config, mesh, checkpointer)
    if jax.process_count() > 1:  # one process: the config summary names the devices
        runtime.log_topology(mesh)

    if checkpointer.latest_step() is not None:
        state, start_step = checkpointer.restore(experiment.abstract_state)
        start_example = resume_position(config, checkpointer.data_position(start_step), start_step)
    else:
        state = experiment.init_state()
        start_step, start_example = 0, 0
    data_iterator = create_data_iterator(config, mesh, start_example)
    config_path = files.join(workdir, "config.json")
    if jax.process_index() == 0:
        files.write_atomically(config_path, config.to_json_best_effort(indent=2))
    for line in summary.config_lines(
        config,
        num_params=sum(x.size for x in jax.tree.leaves(state.params)),
        state_bytes_per_device=parallel.bytes_per_device(state),
        mesh_shape=dict(mesh.shape),
        devices=describe_devices(mesh),
        start_step=start_step,
        config_path=config_path,
    ):
        logging.info("%s", line)

    step_fn = experiment.train_step()
    writer = metric_logging.MetricWriter(workdir)
    # Built before the first step, so that a missing VAE or Inception file fails at start.
    decoder = experiment_lib.latent_decoder(config) if config.sample_every_steps else None
    quality_hook = hooks.SampleQualityHook.from_config(experiment)  # None: off
    lead = jax.process_index() == 0
    progress = console.Progress(
        config.num_train_steps,
        done=start_step,
        label="step",
        items_per_unit=config.global_batch_size,
        enabled=lead,
    )
    throughput = metric_logging.Throughput(config.global_batch_size)
    stop = _StopSignal()
    sample_fn = None
    window: list[dict[str, Any]] = []
    scalars: dict[str, float] = {}
    grid: hooks.GridResult | None = None

    def last_good() -> str:
        """The newest complete checkpoint, after the in-flight write (if any) has ended."""
        try:
            checkpointer.wait()
        except checkpoint.CheckpointWriteError as error:
            logging.error("%s", error)
        latest = checkpointer.latest_step()
        where = checkpointer.directory
        return f"step {latest} in {where}" if latest is not None else f"none yet (in {where})"

    def save(step: int, force: bool = False) -> None:
        bad = checkpoint.nonfinite_leaves(state)
        if bad:
            # The step guards should make this unreachable; if not, never persist NaN/Inf.
            listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteError(
                f"step {step}: the train state holds non-finite values in {listed}; checkpoint "
                f"NOT written. Last good checkpoint: {last_good()}. Rerun to resume from it, "
                "with a lower learning_rate or a grad_clip_norm."
            )
        to_save = state
        if jax.devices()[0].platform == "cpu":
            # On CPU, orbax's "device to host" transfer can alias the device buffers, which the
            # next train step donates while the async write may still read them: save a copy.
            to_save = jax.tree.map(lambda x: x.copy(), state)
        examples = start_example + (step - start_step) * config.global_batch_size
        checkpointer.save(step, to_save, data_position(config, examples), config, force=force)

    step = start_step
    try:
        while step < config.num_train_steps:
            local = next(data_iterator)
            batch = global_batch(local, config, mesh)
            if step == start_step and jax.process_count() > 1:
                # Compile first, then wait for every process: on CPU the first cross-process
                # (gloo) collective gives a late peer only 30 s, and compile times differ.
                step_fn = step_fn.lower(state, batch).compile()
                runtime.barrier(f"train_step_compiled_{step}")
            state, step_metrics = step_fn(state, batch)
            step += 1
            window.append(step_metrics)
            if step == start_step + 1:
                # The first call compiled the step: rates count from here.
                throughput.start(step)
            progress.advance(step)

            if config.nonfinite == "stop" and int(step_metrics["nonfinite"]):
                bad = jax.device_get(step_metrics)
                if bad["overflowed"]:
                    raise overflow_error(step, last_good())
                raise NonFiniteError(
                    f"step {step}: non-finite {train_step.nonfinite_quantity(bad)} "
                    f"(loss={bad['loss']}, grad_norm={bad['grad_norm']}); the update was not "
                    f"applied and training stopped (config.nonfinite='stop'). "
                    f"{describe_nonfinite_inputs(local)}Last good checkpoint: {last_good()}. "
                    "Rerun the same command to resume from it, or set --config.nonfinite=skip "
                    "to drop such steps."
                )
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                host_window = jax.device_get(window)
                window = []
                scalars = metric_logging.summarize(host_window)
                progress.report(step, loss=scalars["loss"])
                if scalars["nonfinite"]:
                    first = step - len(host_window) + 1
                    for offset, m in enumerate(host_window):
                        if m["overflowed"]:
                            raise overflow_error(first + offset, last_good())
                    log_skipped_steps(step, host_window, checkpointer)
                rates = learning_rates_logged(config, step)
                writer.write(step, {**scalars, **throughput.rates(step), **rates})
            if config.sample_every_steps and (
                step % config.sample_every_steps == 0 or step == config.num_train_steps
            ):
                sample_fn = sample_fn or experiment.sample_fn(decoder)
                grid = hooks.write_sample_grid(
                    config, workdir, step, sample_fn, state.ema_params, mesh, writer
                )
                if lead:
                    write_plots(workdir)
            if quality_hook is not None and quality_hook.due(step):
                writer.write(step, quality_hook(state.ema_params))
            stop_now = stop.agreed() or checkpointer.manager.reached_preemption(step)
            milestone = config.keep_every_steps and step % config.keep_every_steps == 0
            if (
                step % config.checkpoint_every_steps == 0
                or milestone
                or step == config.num_train_steps
            ):
                save(step)
            elif stop_now:
                save(step, force=True)
            if stop_now:
                logging.warning("Stopping at step %d after saving (preemption).", step)
                break
        checkpointer.wait()  # raises CheckpointWriteError if the last write failed
    finally:
        progress.close()
        try:
            checkpointer.close()
        except Exception as error:  # never hide the error that is already propagating
            logging.error("closing the checkpointer: %s: %s", type(error).__name__, error)
        writer.close()
        stop.restore()
    plot = write_plots(workdir) if lead and step > start_step else None
    rate = progress.mean_rate()
    outcome = summary.RunOutcome(
        workdir=workdir,
        step=step,
        total_steps=config.num_train_steps,
        seconds=progress.elapsed(),
        images_per_second=None if rate is None else rate * config.global_batch_size,
        last_loss=scalars.get("loss"),
        checkpoint_dir=checkpointer.directory,
        checkpoint_step=checkpointer.latest_step(),
        plot=plot,
        grid=grid.path if grid else None,
        grid_accuracy=grid.digits_accuracy if grid else None,
        grid_size=grid.size if grid else 0,
        stopped_early=step < config.num_train_steps,
    )
    for line in summary.closing_lines(outcome):
        logging.info("%s", line)
    return state


def describe_devices(mesh: jax.sharding.Mesh) -> str:
    """ "1 cpu device", "8 NVIDIA H100 80GB HBM3 devices on 2 processes"."""
    count = mesh.devices.size
    text = f"{count} {mesh.devices.flat[0].device_kind} device{'s' if count > 1 else ''}"
    if jax.process_count() > 1:
        text += f" on {jax.process_count()} processes"
    return text


def write_plots(workdir: str) -> str | None:
    """`plots.write`, but a run never fails over a plot: a problem is logged, None returned."""
    try:
        return plots.write(workdir)
    except (OSError, ValueError) as error:
        logging.warning("No plot of %s: %s", workdir, error)
        return None


def learning_rates_logged(config: ml_collections.ConfigDict, step: int) -> dict[str, float]:
    """The learning rates of the update that led to `step`, as metrics (the SSM dynamics' only
    when they have their own)."""
    rates = train_state.learning_rate_at(config, step - 1)
    logged = {"learning_rate": rates["default"]}
    if config.ssm_learning_rate is not None:
        logged["ssm_learning_rate"] = rates["ssm"]
    return logged


def overflow_error(step: int, last_good: str) -> NonFiniteError:
    """The error for an update that overflowed from finite inputs (train_step: "overflowed")."""
    return NonFiniteError(
        f"step {step}: the optimizer update overflowed although the loss, the gradients and the "
        "learning rates were finite. The state is updated in place, so the update was applied "
        "and training stops whatever config.nonfinite says; the state was not checkpointed. "
        f"Last good checkpoint: {last_good}. Rerun to resume from it, with a lower "
        "learning_rate or a grad_clip_norm."
    )


def describe_nonfinite_inputs(local: dict[str, np.ndarray]) -> str:
    """A sentence counting NaN/Inf per float input of this process's batch ('' if none)."""
    counts = {
        name: int(np.size(value) - np.isfinite(value).sum())
        for name, value in local.items()
        if np.issubdtype(np.asarray(value).dtype, np.floating)
    }
    found = [f"{count} in {name!r}" for name, count in counts.items() if count]
    return f"Input batch has non-finite values: {', '.join(found)}. " if found else ""


def log_skipped_steps(step: int, window: list[dict[str, Any]], checkpointer) -> None:
    """Warns with the step and quantity of each skipped update in a log window ending at `step`."""
    first = step - len(window) + 1
    skipped = [
        f"step {first + offset} ({train_step.nonfinite_quantity(m)})"
        for offset, m in enumerate(window)
        if m["nonfinite"]
    ]
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    shown = ", ".join(skipped[:10]) + more
    logging.warning(
        "Non-finite values: update skipped (config.nonfinite='skip') at %s; parameters unchanged "
        "by those steps. Latest checkpoint: step %s in %s.",
        shown,
        checkpointer.latest_step(),
        checkpointer.directory,
    )


__all__ = ["NonFiniteError", "train"]
