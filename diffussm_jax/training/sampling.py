"""Sampling from a trained state: jitted, sharded over the mesh, labels laid out for grids."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax.training import sharding


def make_sample_fn(
    model: nn.Module,
    diffusion: diffusion_lib.Diffusion,
    mesh: Mesh,
    *,
    sampler: str,
    steps: int | str | None,
    cfg_scale: float | None,
    guidance_channels: int | None = None,
):
    """Returns jitted `sample(params, rng, labels (B,)) -> (B, H, W, C)` in model range.

    B must be a multiple of the device count (see `pad_to_devices`). Unconditional models
    ignore `labels` and never use guidance.
    """
    conditional = model.num_classes > 0
    shape_tail = (model.input_size, model.input_size, model.in_channels)
    batch_sharding = sharding.batch_sharding(mesh)

    def sample(params, rng, labels):
        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y)

        return diffusion_lib.sample(
            model_fn,
            diffusion,
            (labels.shape[0], *shape_tail),
            rng,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale if conditional and cfg_scale not in (None, 1.0) else None,
            labels=labels if conditional else None,
            null_label=model.num_classes if conditional else None,
            guidance_channels=guidance_channels,
            sharding=batch_sharding,
        )

    return jax.jit(sample, out_shardings=sharding.replicated(mesh))


def pad_to_devices(labels: np.ndarray, mesh: Mesh) -> tuple[np.ndarray, int]:
    """Pads labels (repeating the last) to a multiple of the device count; returns (padded, n)."""
    devices = mesh.devices.size
    count = len(labels)
    padded = -(-count // devices) * devices
    return np.concatenate([labels, np.full(padded - count, labels[-1], labels.dtype)]), count


def grid_labels(num_classes: int, classes_in_grid: int, per_class: int) -> np.ndarray:
    """Row r of the grid holds class r (classes spread evenly over all classes)."""
    shown = np.linspace(0, num_classes - 1, min(classes_in_grid, num_classes)).round()
    return np.repeat(shown.astype(np.int32), per_class)


def draw(sample_fn, params: Any, rng: jax.Array, labels: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Runs `sample_fn` on `labels` (any count), returning (len(labels), H, W, C) float32."""
    padded, count = pad_to_devices(np.asarray(labels, np.int32), mesh)
    labels_global = jax.device_put(jnp.asarray(padded), sharding.batch_sharding(mesh))
    return np.asarray(jax.device_get(sample_fn(params, rng, labels_global)))[:count]
