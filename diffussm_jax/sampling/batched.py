"""Drawing many samples: labels padded to the devices, batches of one compiled size, and a noise
key per batch that depends only on where the batch starts.

    draws = BatchedDraw(sample_fn, mesh, labels, batch_size=256, key=jax.random.key(0))
    images = draws.all(params)                      # (len(labels), H, W, C) uint8

Batch b holds labels[start_b : start_b + batch_size] and its noise comes from
fold_in(key, start_b), so a resumed or re-sharded job draws the same images for the same batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffussm_jax import console, evaluation, parallel


def pad_to_devices(labels: np.ndarray, mesh: Mesh) -> tuple[np.ndarray, int]:
    """Pads labels (repeating the last) to a multiple of the device count; returns (padded, n)."""
    devices = mesh.devices.size
    count = len(labels)
    padded = -(-count // devices) * devices
    return np.concatenate([labels, np.full(padded - count, labels[-1], labels.dtype)]), count


def draw(sample_fn, params: Any, rng: jax.Array, labels: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Runs `sample_fn` on `labels` (any count), returning (len(labels), H, W, C) float32."""
    padded, count = pad_to_devices(np.asarray(labels, np.int32), mesh)
    labels_global = jax.device_put(jnp.asarray(padded), parallel.batch_sharding(mesh))
    return np.asarray(jax.device_get(sample_fn(params, rng, labels_global)))[:count]


class BatchedDraw:
    """uint8 samples of a fixed label list, drawn in batches of one size (one compilation).

    `batch_size` is rounded up to a multiple of the mesh's device count; the last batch is
    padded to it and the padding dropped. Images are quantised by `evaluation.to_uint8`.
    """

    def __init__(self, sample_fn, mesh: Mesh, labels: np.ndarray, batch_size: int, key: jax.Array):
        devices = mesh.devices.size
        self.sample_fn = sample_fn
        self.mesh = mesh
        self.labels = np.asarray(labels, np.int32)
        self.batch_size = -(-batch_size // devices) * devices
        self.key = key
        self.starts = list(range(0, len(self.labels), self.batch_size))

    def __len__(self) -> int:
        return len(self.starts)

    def labels_of(self, index: int) -> np.ndarray:
        """The labels of batch `index` (the last batch may be shorter)."""
        start = self.starts[index]
        return self.labels[start : start + self.batch_size]

    def draw(self, params: Any, index: int) -> np.ndarray:
        """Batch `index` as (len(labels_of(index)), H, W, C) uint8."""
        labels = self.labels_of(index)
        padded = np.resize(labels, self.batch_size)
        rng = jax.random.fold_in(self.key, self.starts[index])
        images = draw(self.sample_fn, params, rng, padded, self.mesh)
        return evaluation.to_uint8(images[: len(labels)])

    def all(self, params: Any, progress: console.Progress | None = None) -> np.ndarray:
        """Every batch, concatenated: (len(labels), H, W, C) uint8."""
        chunks = []
        for index in range(len(self)):
            chunks.append(self.draw(params, index))
            if progress is not None:
                progress.report(self.starts[index] + len(chunks[-1]))
        return np.concatenate(chunks)
