"""The training loop: `train_and_evaluate(config, workdir)`.

Creates the mesh, model, diffusion, optimizer and sharded state; resumes from the newest
checkpoint in `workdir` (state, EMA, optimizer, step and data position; on any number of
processes and devices, see `create_data_iterator`); trains with periodic metrics, checkpoints
(rolling, plus milestones every `keep_every_steps`) and EMA sample grids; on SIGTERM
(preemption) saves and returns. `workdir` may be local or a bucket (`gs://...`): every file goes
through `diffussm_jax.files`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffussm_jax import console, data, evaluation, files
from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax.training import (
    checkpoint,
    distributed,
    fid_eval,
    metrics,
    plots,
    sampling,
    sharding,
    summary,
    train_state,
    train_step,
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


PROCESSES = ("gaussian", "flow")

# Fields added with the flow process and the prediction options, and their values in runs saved
# before they existed (the paper's recipe); for "process" see `train_state.process_name`.
_DIFFUSION_DEFAULTS = {
    "prediction": "eps",
    "loss_weighting": "none",
    "min_snr_gamma": 5.0,
    "t_sampling": "uniform",
    "logit_mean": 0.0,
    "logit_std": 1.0,
}


def _diffusion_setting(config: ml_collections.ConfigDict, name: str):
    return config.diffusion.get(name, _DIFFUSION_DEFAULTS[name])


def create_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.Process:
    """The process `config.diffusion` describes: Gaussian (`diffusion.create`) or flow.

    Raises:
      ValueError: an unknown process, or settings that do not fit it, listing every override
        that would fix the config.
    """
    process = train_state.process_name(config)
    setting = functools.partial(_diffusion_setting, config)
    if process not in PROCESSES:
        raise ValueError(
            f"config.diffusion.process={process!r}; choose one of {PROCESSES} (docs/objectives.md)."
        )
    if process == "flow":
        # The flow network predicts the velocity with C output channels: nothing of the
        # Gaussian process's variance, prediction or weighting options applies.
        fixes = []
        if config.model.learn_sigma:
            fixes.append("--config.model.learn_sigma=False (there is no variance to learn)")
        if config.diffusion.loss != "mse":
            fixes.append(f"--config.diffusion.loss=mse (not {config.diffusion.loss!r})")
        if setting("prediction") != "eps":
            fixes.append("--config.diffusion.prediction=eps (a flow network predicts eps - x_0)")
        if setting("loss_weighting") != "none":
            fixes.append("--config.diffusion.loss_weighting=none (min-SNR is Gaussian only)")
        if fixes:
            raise ValueError(
                "config.diffusion.process='flow' (the network predicts the velocity eps - x_0) "
                f"needs {'; '.join(fixes)}."
            )
        return diffusion_lib.create_flow(
            t_sampling=setting("t_sampling"),
            logit_mean=setting("logit_mean"),
            logit_std=setting("logit_std"),
        )
    if setting("t_sampling") != "uniform":
        raise ValueError(
            f"config.diffusion.t_sampling={setting('t_sampling')!r} draws flow times; the "
            "Gaussian process draws its integer steps uniformly. Set "
            "--config.diffusion.process=flow, or --config.diffusion.t_sampling=uniform."
        )
    return diffusion_lib.create(
        num_timesteps=config.diffusion.num_timesteps,
        schedule=config.diffusion.schedule,
        learn_sigma=config.model.learn_sigma,
        loss=config.diffusion.loss,
        prediction=setting("prediction"),
        loss_weighting=setting("loss_weighting"),
        min_snr_gamma=setting("min_snr_gamma"),
    )


def check_samplers(config: ml_collections.ConfigDict, diffusion: diffusion_lib.Process) -> None:
    """Fails at start, not at the first sample grid, when a configured sampler cannot sample
    `diffusion` (`config.sampling.sampler`, and `config.eval.sampler` when set).
    """
    fields = {"sampling.sampler": config.sampling.sampler}
    eval_config = config.get("eval")
    if eval_config is not None and eval_config.sampler:
        fields["eval.sampler"] = eval_config.sampler
    valid = diffusion_lib.samplers_for(diffusion)
    for field, sampler in fields.items():
        if sampler not in valid:
            raise ValueError(
                f"config.{field}={sampler!r} cannot sample config.diffusion.process="
                f"{train_state.process_name(config)!r}; set --config.{field} to one of "
                f"{valid}."
            )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a config builds for training: the model, its diffusion, optimizer, state and step."""

    model: Any
    diffusion: diffusion_lib.Process
    tx: Any
    mesh: jax.sharding.Mesh
    state: train_state.TrainState
    step_fn: Any  # jitted (state, batch) -> (state, metrics)


def create_experiment(config: ml_collections.ConfigDict, mesh, model=None) -> Experiment:
    """A freshly initialised experiment of `config` on `mesh` (`model` replaces the config's).

    For training loops that feed their own batches (scripts/digits_sweep.py, the learning test);
    `train_and_evaluate` adds the data pipeline, checkpoints and hooks around the same pieces.
    """
    model = train_state.build_model(config) if model is None else model
    diffusion = create_diffusion(config)
    tx = train_state.create_optimizer(config)
    state, shardings = train_state.create_train_state(config, model, tx, mesh)
    step_fn = train_step.make_train_step(config, model, diffusion, mesh, shardings)
    return Experiment(model, diffusion, tx, mesh, state, step_fn)


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
            mesh, global_batch_size, jax.sharding.PartitionSpec(sharding.BATCH_AXES)
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
        image_size=config.data.center_crop,
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
    """`sharding.check_global_batch`, saying what to do when a checkpointed run is resumed on a
    device count that its global batch does not divide."""
    try:
        sharding.check_global_batch(config.global_batch_size, mesh)
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
    return data.make_global_batch(local, mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))


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
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state."""
    workdir = check_workdir(workdir)
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"config.nonfinite={config.nonfinite!r}; choose one of {NONFINITE_POLICIES}: 'skip' "
            "drops a step with a NaN/Inf loss or gradient, 'stop' ends training there."
        )
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    checkpointer = checkpoint.Checkpointer(
        workdir,
        keep=config.keep_checkpoints,
        keep_every_steps=config.keep_every_steps,
        owner=True,
    )
    check_batch_fits(config, mesh, checkpointer)
    if jax.process_count() > 1:  # one process: the config summary names the devices
        distributed.log_topology(mesh)

    model = train_state.build_model(config)
    diffusion = create_diffusion(config)
    check_samplers(config, diffusion)
    tx = train_state.create_optimizer(config)

    abstract_state, state_shardings = train_state.abstract_train_state(config, model, tx, mesh)
    if checkpointer.latest_step() is not None:
        state, start_step = checkpointer.restore(abstract_state)
        start_example = resume_position(config, checkpointer.data_position(start_step), start_step)
    else:
        state, _ = train_state.create_train_state(config, model, tx, mesh)
        start_step, start_example = 0, 0
    data_iterator = create_data_iterator(config, mesh, start_example)
    config_path = files.join(workdir, "config.json")
    if jax.process_index() == 0:
        files.write_atomically(config_path, config.to_json_best_effort(indent=2))
    for line in summary.config_lines(
        config,
        num_params=sum(x.size for x in jax.tree.leaves(state.params)),
        state_bytes_per_device=sharding.bytes_per_device(state),
        mesh_shape=dict(mesh.shape),
        devices=describe_devices(mesh),
        start_step=start_step,
        config_path=config_path,
    ):
        logging.info("%s", line)

    step_fn = train_step.make_train_step(config, model, diffusion, mesh, state_shardings)
    writer = metrics.MetricWriter(workdir)
    # Built before the first step, so that a missing VAE or Inception file fails at start.
    decoder = sampling.latent_decoder(config) if config.sample_every_steps else None
    fid_hook = fid_eval.InTrainingFID.from_config(config, model, diffusion, mesh)  # None: off
    lead = jax.process_index() == 0
    progress = console.Progress(
        config.num_train_steps,
        done=start_step,
        label="step",
        items_per_unit=config.global_batch_size,
        enabled=lead,
    )
    throughput = metrics.Throughput(config.global_batch_size)
    stop = _StopSignal()
    sample_fn = None
    window: list[dict[str, Any]] = []
    scalars: dict[str, float] = {}
    grid: GridResult | None = None

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
                distributed.barrier(f"train_step_compiled_{step}")
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
                scalars = metrics.summarize(host_window)
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
                sample_fn = sample_fn or sampling.make_sample_fn(
                    model,
                    diffusion,
                    mesh,
                    sampler=config.sampling.sampler,
                    steps=config.sampling.steps,
                    cfg_scale=config.sampling.cfg_scale,
                    clip_denoised=sampling.clip_denoised_for(config),
                    decoder=decoder,
                )
                grid = write_sample_grid(
                    config, workdir, step, sample_fn, state.ema_params, mesh, writer
                )
                if lead:
                    write_plots(workdir)
            if fid_hook is not None and fid_hook.due(step):
                writer.write(step, fid_hook(state.ema_params))
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


@dataclasses.dataclass(frozen=True)
class GridResult:
    """A sample grid written at `step`; the digits get the classifier's accuracy on it."""

    step: int
    path: str
    size: int
    digits_accuracy: float | None = None


def write_sample_grid(config, workdir, step, sample_fn, params, mesh, writer) -> GridResult:
    """EMA samples, one row per class for conditional models, as `samples/step_<N>.png`.

    Class-conditional digits are scored by the digits classifier (the fraction classified as
    the requested digit, metric `eval/grid_digits_accuracy`) on process 0.
    """
    sampling_config = config.sampling
    if config.data.num_classes > 0:
        labels = sampling.grid_labels(
            config.data.num_classes, sampling_config.num_classes_in_grid, sampling_config.per_class
        )
        rows = len(labels) // sampling_config.per_class
    else:
        labels = np.zeros(sampling_config.num_unconditional, np.int32)
        rows = int(np.sqrt(len(labels)))
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
    images = metrics.to_uint8(sampling.draw(sample_fn, params, rng, labels, mesh))
    grid = metrics.image_grid(images, rows)
    path = files.join(workdir, "samples", f"step_{step:07d}.png")
    accuracy = None
    if jax.process_index() == 0:
        metrics.save_png(path, grid)
        writer.write_image(step, "ema_samples", grid)
        files.write_atomically(
            files.join(workdir, "samples", "latest.json"),
            json.dumps({"step": step, "path": path, "labels": labels.tolist()}),
        )
        scored = ""
        if config.data.name == data.EmbeddedDigits.name and config.data.num_classes > 0:
            quality = evaluation.digits_quality(images, labels, data_dir=config.data.data_dir)
            accuracy = float(quality["accuracy"])
            writer.write(step, {"eval/grid_digits_accuracy": accuracy})
            scored = f", {accuracy:.1%} of {len(labels)} classified as the requested digit"
        if step < config.num_train_steps:  # the last grid is in the closing summary
            logging.info("step %d: sample grid %s%s", step, summary.shown_path(path), scored)
    return GridResult(step, path, len(labels), accuracy)


__all__ = ["NonFiniteError", "train_and_evaluate"]
