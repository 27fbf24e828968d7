"""Training: the experiment builder, the sharded state, the step, checkpoints and the loop.

experiment.py      `setup(config) -> Experiment`: model, diffusion, optimizer, mesh and the
                   state's shardings, built once for every entry point; the config's
                   readings they share (the diffusion process, clipping, the VAE decoder)
train_state.py     the TrainState, the model and optimizer a config names, sharded init
train_step.py      the jitted, donated train step with its non-finite guard
checkpoint.py      orbax checkpoints of state, data position and config; resume
loop.py            `train(config, workdir)`: the loop, preemption, cadence
hooks.py           what the loop runs besides training: EMA sample grids, sample quality
metric_logging.py  metrics.jsonl, TensorBoard events, throughput
summary.py         the opening and closing lines a run prints
plots.py           the PNG of a run's metrics

from diffussm_jax import training
training.train(config, workdir)
"""

from diffussm_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from diffussm_jax.training.experiment import (
    Experiment,
    clip_denoised_for,
    create_diffusion,
    latent_decoder,
    sampling_settings,
    setup,
)
from diffussm_jax.training.loop import NonFiniteError, train
from diffussm_jax.training.train_state import (
    TrainState,
    build_model,
    create_optimizer,
    create_train_state,
)
from diffussm_jax.training.train_step import ema_update, make_train_step

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "Experiment",
    "NonFiniteError",
    "TrainState",
    "build_model",
    "clip_denoised_for",
    "create_diffusion",
    "create_optimizer",
    "create_train_state",
    "ema_update",
    "latent_decoder",
    "make_train_step",
    "sampling_settings",
    "setup",
    "train",
]
