"""A trained run, restored for inference: its config, and the EMA weights of one checkpoint.

    config = load_config(workdir)
    experiment = training.setup(config, for_training=False)
    params, step = restore_ema_params(experiment, workdir)          # newest checkpoint

Only the `ema_params` field of the saved train state is read (orbax partial restore): neither
the training weights nor Adam's two moments, three quarters of the checkpoint under AdamW.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from diffussm_jax import files
from diffussm_jax.training import checkpoint, train_state
from diffussm_jax.training import experiment as experiment_lib


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (`<workdir>/config.json`), in the current layout
    (`train_state.upgrade_saved_config`: runs saved before a field moved still load), locked."""
    checkpoint.check_location(workdir)  # before any read: s3:// never holds a run's checkpoints
    path = files.join(workdir, "config.json")
    if not files.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by launch.train."
        )
    with files.open(path) as f:
        return train_state.upgrade_saved_config(ml_collections.ConfigDict(json.load(f)))


def restore_ema_params(
    experiment: experiment_lib.Experiment, workdir: str, checkpoint_step: int | None = None
) -> tuple[Any, int]:
    """(EMA params sharded over the experiment's mesh, step) of checkpoint `checkpoint_step`
    (unset: the newest that restores)."""
    checkpointer = checkpoint.Checkpointer(workdir, keep=experiment.config.keep_checkpoints)
    try:
        return checkpointer.restore(
            experiment.abstract_params(), step=checkpoint_step, subtree="ema_params"
        )
    finally:
        checkpointer.close()
