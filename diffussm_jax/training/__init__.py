"""Training: sharded state, train step, checkpoints, metrics, and the loop.

from diffussm_jax import training
training.train_and_evaluate(config, workdir)
"""

from diffussm_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from diffussm_jax.training.sharding import create_mesh
from diffussm_jax.training.train_state import (
    TrainState,
    build_model,
    create_optimizer,
    create_train_state,
)
from diffussm_jax.training.train_step import ema_update, make_train_step
from diffussm_jax.training.trainer import NonFiniteError, create_diffusion, train_and_evaluate

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "NonFiniteError",
    "TrainState",
    "build_model",
    "create_diffusion",
    "create_mesh",
    "create_optimizer",
    "create_train_state",
    "ema_update",
    "make_train_step",
    "train_and_evaluate",
]
