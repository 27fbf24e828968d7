"""Orbax checkpoints of the train state, the data iterator position and the config.

Each step directory holds three items: `state` (the sharded TrainState, written cooperatively by
all processes), `data` (each process's grain iterator state) and `config` (JSON). Saving is
asynchronous; orbax finalises a step directory atomically, so a crash mid-save leaves no step
that looks complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

STATE, DATA, CONFIG = "state", "data", "config"


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameters do not fit the model being restored."""


class Checkpointer:
    """Save / restore `TrainState` + data iterator + config under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None,
        config: ml_collections.ConfigDict,
        *,
        force: bool = False,
    ) -> bool:
        items = {
            STATE: ocp.args.StandardSave(state),
            CONFIG: ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None
    ) -> tuple[Any, int]:
        """Restores into `abstract_state`'s shapes and shardings (any mesh); moves the iterator."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._check_compatible(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("Restored checkpoint step %d from %s", step, self.directory)
        return restored[STATE], step

    def _check_compatible(self, step: int, abstract_state: Any) -> None:
        """Names every parameter whose shape differs, instead of orbax's first-failure error."""
        saved = self.manager.item_metadata(step)[STATE]
        saved_params = getattr(saved, "params", None)
        if saved_params is None and isinstance(saved, dict):
            saved_params = saved.get("params")
        if saved_params is None:
            return
        expected = {
            jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)
        }
        found = {
            jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(saved_params)
        }
        problems = [
            f"{name}: checkpoint {found.get(name)} vs model {shape}"
            for name, shape in expected.items()
            if found.get(name) != shape
        ]
        problems += [f"{name}: in checkpoint only" for name in sorted(set(found) - set(expected))]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} was made with a different model or "
                f"config ({len(problems)} mismatched parameters):\n  {shown}{more}\n"
                "Use the config the checkpoint was trained with (saved beside it as "
                "'config'), or a new --workdir."
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.asarray([jax.numpy.isfinite(x).all() for x in leaves]))


def all_finite(tree: Any) -> bool:
    """True if every float leaf is finite (checked before a checkpoint is written)."""
    if not jax.tree.leaves(tree):
        return True
    return bool(_all_finite(tree))
