"""What a run says about itself on the console: its config in a few lines, and where it left
everything when it ends. The whole config goes to `<workdir>/config.json`, not to the console.

    for line in config_lines(config, ...):   # at the start
        logging.info(line)
    for line in closing_lines(...):          # at the end
        logging.info(line)
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from diffussm_jax import files
from diffussm_jax.console import format_rate, format_seconds


def _set_fields(block: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """The fields of `block` that hold a value, nested blocks' as dotted names ("ssm.init")."""
    fields = {}
    for key, value in block.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields.update(_set_fields(value, f"{prefix}{key}."))
        elif value is not None:
            fields[prefix + key] = value
    return fields


def _describe_diffusion(config: ml_collections.ConfigDict) -> str:
    diffusion = config.diffusion
    if diffusion.process == "flow":
        return f"flow matching (t {diffusion.t_sampling})"
    weighting = diffusion.loss_weighting
    return (
        f"gaussian diffusion: {diffusion.num_timesteps} {diffusion.schedule} steps, "
        f"{diffusion.prediction} prediction, {diffusion.loss} loss"
        + ("" if weighting == "none" else f", {weighting} weighting")
    )


def config_lines(
    config: ml_collections.ConfigDict,
    *,
    num_params: int,
    state_bytes_per_device: int,
    mesh_shape: dict[str, int],
    devices: str,
    start_step: int,
    config_path: str,
) -> list[str]:
    """Five lines: model, data and schedule, optimizer and diffusion, cadences, where the
    whole config is. `devices` describes the mesh's devices, e.g. "8 NVIDIA H100"."""
    fields = ", ".join(f"{k}={v}" for k, v in _set_fields(config.model).items())
    model = f"{config.model_name} ({fields})" if fields else config.model_name
    data = config.data
    shape = f"{data.image_size}x{data.image_size}x{data.channels}"
    classes = f"{data.num_classes} classes" if data.num_classes else "unconditional"
    mesh = " x ".join(f"{name} {size}" for name, size in mesh_shape.items())
    steps = (
        f"{config.num_train_steps} steps"
        if start_step == 0
        else f"resuming at step {start_step} of {config.num_train_steps}"
    )
    optimizer = f"AdamW lr {config.learning_rate:g}"
    if config.warmup_steps:
        optimizer += f" (warmup {config.warmup_steps})"
    if config.grad_clip_norm:
        optimizer += f", clip {config.grad_clip_norm:g}"
    optimizer += f", EMA {config.ema_decay:g}" + (" with warmup" if config.ema_warmup else "")
    cadence = [f"metrics every {config.log_every_steps} steps"]
    cadence.append(f"a checkpoint every {config.checkpoint_every_steps}")
    if config.sample_every_steps:
        sampling = config.sampling
        cadence.append(
            f"a sample grid every {config.sample_every_steps} ({sampling.sampler}, "
            f"{sampling.steps} steps, guidance {sampling.cfg_scale:g})"
        )
    if config.eval.fid_every_steps:
        cadence.append(f"FID on {config.eval.fid_num_samples} every {config.eval.fid_every_steps}")
    return [
        f"{model}: {num_params / 1e6:.2f}M parameters, "
        f"{state_bytes_per_device / 2**20:.1f} MiB of state per device",
        f"{data.name} {shape}, {classes}; global batch {config.global_batch_size} over "
        f"{devices} (mesh {mesh}); {steps}",
        f"{optimizer}; {_describe_diffusion(config)}",
        "; ".join(cadence),
        f"full config: {shown_path(config_path)}",
    ]


@dataclasses.dataclass
class RunOutcome:
    """What the closing summary reports about a finished (or stopped) run."""

    workdir: str
    step: int
    total_steps: int
    seconds: float
    images_per_second: float | None
    last_loss: float | None
    checkpoint_dir: str
    checkpoint_step: int | None
    plot: str | None = None
    grid: str | None = None
    grid_accuracy: float | None = None
    grid_size: int = 0
    stopped_early: bool = False


def shown_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else absolute (a bucket
    URL as it is)."""
    if files.is_remote(path):
        return path
    path = os.path.abspath(path)
    here = os.getcwd()
    return os.path.relpath(path, here) if path.startswith(os.path.join(here, "")) else path


def closing_lines(outcome: RunOutcome) -> list[str]:
    """The closing summary: how far the run got, and where its outputs are."""
    rel = shown_path
    if outcome.stopped_early:
        head = (
            f"Stopped at step {outcome.step} of {outcome.total_steps} (preemption); the same "
            "command resumes from the checkpoint."
        )
    else:
        head = f"Done: step {outcome.step} of {outcome.total_steps}"
    head += f" in {format_seconds(outcome.seconds)}"
    if outcome.images_per_second is not None:
        head += f" ({format_rate(outcome.images_per_second)} img/s)"
    if outcome.last_loss is not None:
        head += f"; last loss {outcome.last_loss:.4g}"
    lines = [head]
    newest = "none" if outcome.checkpoint_step is None else f"step {outcome.checkpoint_step}"
    lines.append(f"  checkpoints  {rel(outcome.checkpoint_dir)} (newest: {newest})")
    metrics = rel(files.join(outcome.workdir, "metrics.jsonl"))
    tensorboard = rel(files.join(outcome.workdir, "tb"))
    lines.append(f"  metrics      {metrics}; TensorBoard: tensorboard --logdir {tensorboard}")
    if outcome.plot:
        lines.append(f"  plots        {rel(outcome.plot)}")
    if outcome.grid:
        grid = f"  samples      {rel(outcome.grid)}"
        if outcome.grid_accuracy is not None:
            grid += (
                f": {outcome.grid_accuracy:.1%} of {outcome.grid_size} classified as the "
                "requested digit"
            )
        lines.append(grid)
    return lines
