"""Orbax checkpoints of the train state, the data position and the config.

Each step directory holds three items: `state` (the sharded TrainState, written cooperatively by
all processes), `data_position` (JSON: how many examples of the global example stream the run
has consumed; one number for the whole job, so a run resumes on any number of processes and
devices, see `loop.create_data_iterator`) and `config` (JSON). Saving is asynchronous.

Which steps are kept: the newest `keep` steps (rolling), plus every step that is a multiple of
`keep_every_steps` (milestones, never deleted; the trainer saves at those steps).

A kill at any moment leaves no step that looks complete but is not:
  * local disk (and mounted filesystems): a step is written under `<step>.orbax-checkpoint-tmp`
    and renamed to `<step>` once complete (an atomic rename);
  * object storage (`gs://`, `s3://`), which has no rename: the step is written in place under
    `<step>/` and `<step>/commit_success.txt` is written last; a step without it is incomplete.
    Orbax lists only committed steps.
What a kill can leave behind, and what the training job (`owner=True`) does with it on restart:
  * a half-written step (`<step>.orbax-checkpoint-tmp`, or on object storage `<step>/` without
    `commit_success.txt`): logged and removed; the newest complete step is restored.
  * an old step being deleted (rotation): on local disk orbax first renames it into
    `deleted/`, an atomic move out of the step namespace, so a partly deleted step never looks
    like a checkpoint; `deleted/` is emptied at start and after each save. On object storage
    orbax deletes the objects in place; a step caught half-deleted either lost its commit file
    (then it is half-written, above) or lost some arrays (then it fails to restore, below).
  * a complete step that still fails to restore (disk corruption, a file removed by hand):
    logged, the previous step is restored, and the unreadable one is moved to `unreadable/`
    (kept for inspection) so the run can write that step again.
Readers (`owner=False`, e.g. sampling from a live run) change nothing on disk.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffussm_jax import files

STATE, DATA_POSITION, CONFIG = "state", "data_position", "config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step (or item) still being written
COMMIT_FILE = "commit_success.txt"  # on object storage, written last into a complete step
DELETED_DIR = "deleted"  # old steps are renamed here, then removed (never a step name)
UNREADABLE_DIR = "unreadable"  # complete steps that failed to restore, kept for inspection


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameters do not fit the model being restored."""


class CheckpointStepNotFoundError(FileNotFoundError):
    """A checkpoint step was asked for that the directory does not hold (names the ones it does)."""


class UnsupportedCheckpointLocation(ValueError):
    """Checkpoints were asked for in a store that orbax cannot write (an `s3://` bucket)."""


def check_location(workdir: str) -> None:
    """Raises `UnsupportedCheckpointLocation` for a workdir whose checkpoints orbax cannot hold.

    orbax (0.11) writes array data through tensorstore to local paths and `gs://` only: an
    `s3://` path fails deep inside it ("Checkpoint path should be absolute").
    """
    if str(workdir).startswith("s3://"):
        raise UnsupportedCheckpointLocation(
            f"--workdir={workdir}: a run's checkpoints cannot live on s3:// (orbax, the "
            "checkpoint library, reads and writes local paths and gs:// only). Use a gs:// "
            "bucket, or mount the S3 bucket (e.g. mountpoint-s3) and pass the mounted path. "
            "Sample and evaluation "
            "outputs (launch.sample --output, launch.evaluate --output_dir) may be s3:// paths."
        )


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. the disk is full); earlier checkpoints are intact."""


def _join_orbax_writers(timeout_s: float = 300.0) -> None:
    """Waits for orbax's writer threads after a failed save.

    orbax reports the first item that fails at once, while the other items' writes (the state's
    arrays, then its metadata) go on in background threads; left running, they recreate the
    half-written step after it has been removed. orbax has no public call for this, so its
    thread class is looked up defensively: if it moves, this waits for nothing.
    """
    try:
        from orbax.checkpoint._src.futures import future as orbax_future
    except ImportError:
        return
    writer_class = getattr(orbax_future, "_SignalingThread", None)
    if writer_class is None:
        return
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if isinstance(thread, writer_class) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def half_written(directory: str) -> list[str]:
    """Names of the step directories in `directory` that are being written, or that a killed
    write left incomplete: `<step>.orbax-checkpoint-tmp...` on local disk, and on object
    storage (no rename: a step is written in place and committed last) `<step>/` without
    `commit_success.txt`."""
    names = files.listdir(directory) if files.isdir(directory) else []
    half = [name for name in names if TMP_SUFFIX in name]
    if files.is_remote(directory):
        half += [
            name
            for name in names
            if name.isdigit() and not files.exists(files.join(directory, name, COMMIT_FILE))
        ]
    return half


class Checkpointer:
    """Save / restore `TrainState` + data position + config under `<workdir>/checkpoints`.

    Args:
      workdir: the run directory (local, or `gs://bucket/...`); checkpoints live in
        `<workdir>/checkpoints`.
      keep: number of newest steps to keep (rolling).
      keep_every_steps: also keep every step that is a multiple of this, forever (milestones);
        0 keeps none beyond `keep`.
      async_save: write in a background thread while training continues.
      owner: True for the training job that writes this directory: it removes half-written
        steps left by a killed run and moves unreadable ones aside. False (readers such as
        sampling from a running job) never changes anything on disk.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        keep_every_steps: int = 0,
        async_save: bool = True,
        owner: bool = False,
    ):
        if keep < 1 or keep_every_steps < 0:
            raise ValueError(
                f"keep_checkpoints={keep} must be >= 1 and keep_every_steps={keep_every_steps} "
                ">= 0 (0: no milestones)."
            )
        check_location(workdir)
        self.directory = files.join(files.resolve(workdir), "checkpoints")
        self.owner = owner
        self._in_flight: int | None = None  # step whose async write may still be running
        if owner:
            if jax.process_index() == 0:
                files.makedirs(self.directory)
                self._remove_half_written()
                self._empty_deleted()
            if jax.process_count() > 1:
                # Nobody lists steps before process 0 has removed the half-written ones.
                multihost_utils.sync_global_devices("diffussm checkpoint cleanup")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep if owner else None,  # readers never save or delete
                keep_period=keep_every_steps or None,  # steps % keep_period == 0 stay
                save_interval_steps=1 if owner else 0,
                create=owner,
                enable_async_checkpointing=async_save,
                # Buckets (gs://, s3://) have no atomic rename: commit-file steps there (orbax's
                # default for gs:// only; s3:// would otherwise copy a step into place).
                temporary_path_class=(
                    ocp.path.atomicity.CommitFileTemporaryPath
                    if files.is_remote(self.directory)
                    else None
                ),
                todelete_subdir=DELETED_DIR if owner else None,
                read_only=not owner,
            ),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA_POSITION: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_position: dict[str, int] | None,
        config: ml_collections.ConfigDict,
        *,
        force: bool = False,
    ) -> bool:
        """Starts writing `step` (returns before the write ends when async).

        Args:
          data_position: JSON-able position of the global example stream after `step`
            (`trainer.data_position`), or None.

        Raises:
          CheckpointWriteError: this or the previous (in-flight) write failed, e.g. disk full.
        """
        self.wait()  # surfaces a failure of the previous async write under its own step
        items = {
            STATE: ocp.args.StandardSave(state),
            CONFIG: ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        }
        if data_position is not None:
            items[DATA_POSITION] = ocp.args.JsonSave(data_position)
        if self.owner and jax.process_index() == 0:
            self._empty_deleted()
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:
            raise self._write_failed(step, error) from error
        if saved:
            self._in_flight = step
        return saved

    def wait(self) -> None:
        """Blocks until the in-flight write (if any) is on disk.

        Raises:
          CheckpointWriteError: that write failed; earlier checkpoints are intact.
        """
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._write_failed(step, error) from error

    def _write_failed(self, step: int | None, error: Exception) -> CheckpointWriteError:
        """Removes the half-written step and explains what happened and what to do."""
        try:
            self.manager.wait_until_finished()  # no writer thread may still be in the step
        except Exception:  # the same failure, already being reported
            pass
        _join_orbax_writers()
        if self.owner and jax.process_index() == 0:
            self._remove_half_written(quiet=True)
        self.manager.reload()
        previous = self.latest_step()
        kept = (
            f"The previous checkpoint (step {previous}) is intact"
            if previous is not None
            else "No earlier checkpoint exists"
        )
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            fix = (
                "The disk is full: free space (or lower keep_checkpoints, or use a --workdir on "
                "a larger disk) and rerun the same command to resume"
            )
        else:
            fix = "Fix the cause and rerun the same command to resume"
        return CheckpointWriteError(
            getattr(error, "errno", None) or errno.EIO,
            f"writing checkpoint step {step} to {self.directory} failed: "
            f"{type(error).__name__}: {error}. {kept}; the half-written step was removed. {fix}"
            + (f" from step {previous}." if previous is not None else "."),
        )

    def restore(
        self, abstract_state: Any, step: int | None = None, *, subtree: str | None = None
    ) -> tuple[Any, int]:
        """Restores into `abstract_state`'s shapes and shardings (any mesh).

        `subtree` (a field of the saved state, e.g. "ema_params") reads that field alone, into
        `abstract_state` given as the abstract of that field: inference reads the EMA weights
        and none of the optimizer's moments (a quarter of the bytes under AdamW).

        With `step` unset, the newest step that restores is used: a step that fails to read is
        logged and skipped (and, for the owner, moved to `unreadable/` once an older step has
        restored, which proves the failure is the step's, not this setup's). A given `step`
        that does not exist is an error listing the steps that do.

        Raises:
          FileNotFoundError: no checkpoint at all.
          CheckpointStepNotFoundError: no checkpoint at the given `step`.
          CheckpointMismatchError: the newest checkpoint was made with another model/config.
          RuntimeError: no checkpoint could be read (the first failure is chained).
        """
        available = self.all_steps()
        if step is not None and step not in available:
            raise CheckpointStepNotFoundError(
                f"no checkpoint at step {step} in {self.directory}; its steps are {available}. "
                "Pick one of them, or leave the step unset for the newest (runs keep the newest "
                "keep_checkpoints steps and every multiple of keep_every_steps)."
            )
        candidates = [step] if step is not None else available[::-1]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures: list[tuple[int, Exception]] = []
        for candidate in candidates:
            try:
                self._check_compatible(candidate, abstract_state, subtree)
                restored = self._read_state(candidate, abstract_state, subtree)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # anything unreadable: try the previous step
                if step is not None:
                    raise
                logging.warning(
                    "Checkpoint step %d in %s could not be restored (%s: %s); trying the "
                    "previous step.",
                    candidate,
                    self.directory,
                    type(error).__name__,
                    str(error)[:500],
                )
                failures.append((candidate, error))
                continue
            for bad_step, _ in failures:
                self._move_aside(bad_step)
            logging.info("Restored checkpoint step %d from %s", candidate, self.directory)
            return restored, candidate
        tried = ", ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in failures)
        raise RuntimeError(
            f"no checkpoint in {self.directory} could be restored ({tried}). If the model or "
            "config changed, use the config saved with the run (<workdir>/config.json); "
            "otherwise start a new --workdir."
        ) from failures[0][1]

    def data_position(self, step: int) -> dict[str, int] | None:
        """The data position saved with `step`; None for checkpoints written before it existed
        (they hold one grain iterator state per process instead, in `data/`)."""
        if not files.exists(files.join(self.directory, str(step), DATA_POSITION)):
            return None
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{DATA_POSITION: ocp.args.JsonRestore()})
        )
        return dict(restored[DATA_POSITION])

    def _read_state(self, step: int, abstract_state: Any, subtree: str | None) -> Any:
        if subtree is None:
            items = {STATE: ocp.args.StandardRestore(abstract_state)}
            return self.manager.restore(step, args=ocp.args.Composite(**items))[STATE]
        item = {subtree: abstract_state}
        restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding), item)
        path = files.join(self.directory, str(step), STATE)
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        return restored[subtree]

    def _check_compatible(self, step: int, abstract_state: Any, subtree: str | None) -> None:
        """Names every parameter whose shape differs, instead of orbax's first-failure error."""
        saved = self.manager.item_metadata(step)[STATE]
        saved = getattr(saved, "tree", saved)  # orbax's TreeMetadata wraps a dict
        saved_params = getattr(saved, "params", None)
        if saved_params is None and isinstance(saved, dict):
            saved_params = saved.get("params")
        if saved_params is None:
            return
        expected = {
            jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                abstract_state if subtree else abstract_state.params
            )
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

    def _remove_half_written(self, quiet: bool = False) -> None:
        """Deletes the steps that a kill (or a failed write) left incomplete."""
        for name in half_written(self.directory):
            path = files.join(self.directory, name)
            if not quiet:
                logging.warning(
                    "Ignoring half-written checkpoint %s (a previous run stopped while writing "
                    "it); removing it and resuming from the newest complete step.",
                    path,
                )
            files.remove_tree(path)

    def _empty_deleted(self) -> None:
        """Removes old steps that orbax has already moved out of the step namespace."""
        trash = files.join(self.directory, DELETED_DIR)
        if not files.is_remote(trash) and files.isdir(trash):
            for name in files.listdir(trash):
                files.remove_tree(files.join(trash, name))

    def _move_aside(self, step: int) -> None:
        """Moves an unreadable complete step to `unreadable/` so the run can write it again."""
        if not self.owner:
            return
        if jax.process_index() == 0:
            source = files.join(self.directory, str(step))
            target = files.join(self.directory, UNREADABLE_DIR, str(step))
            suffix = 0
            while files.exists(target):
                suffix += 1
                target = files.join(self.directory, UNREADABLE_DIR, f"{step}_{suffix}")
            if files.is_remote(source):
                # Copy-then-delete: drop the commit file first, so a kill mid-move leaves an
                # uncommitted step (removed at the next start), never a second "complete" one.
                files.remove(files.join(source, COMMIT_FILE))
            files.rename(source, target)
            logging.warning("Moved unreadable checkpoint step %d to %s.", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("diffussm checkpoint move aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the in-flight write and releases orbax's threads."""
        self.manager.close()


@jax.jit
def _finite_leaves(tree: Any) -> list[jax.Array]:
    return [jax.numpy.isfinite(x).all() for x in tree]


def nonfinite_leaves(tree: Any) -> list[str]:
    """Key paths of the float leaves of `tree` holding a NaN or Inf (empty: all finite)."""
    named = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)
    ]
    if not named:
        return []
    flags = jax.device_get(_finite_leaves([leaf for _, leaf in named]))
    return [name for (name, _), finite in zip(named, flags, strict=True) if not np.all(finite)]
