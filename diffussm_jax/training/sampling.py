"""Sampling from a trained state: jitted, sharded over the mesh, labels laid out for grids.

Latent models (`config.data.latent_scale` set) sample latents; a `LatentDecoder` (the frozen
VAE of `config.vae.path`) turns them into images, so every caller of a sample function gets
(B, H, W, C) images in [-1, 1] whatever space the model works in:

    decoder = latent_decoder(config)                  # None for pixel-space configs
    sample_fn = make_sample_fn(model, diffusion, mesh, sampler=..., steps=..., cfg_scale=...,
                               decoder=decoder)
    images = draw(sample_fn, params, rng, labels, mesh)
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax import vae as vae_lib
from diffussm_jax.training import sharding, train_state


class LatentDecoder:
    """Scaled latents (B, h, w, c) -> images (B, h*f, w*f, 3) in [-1, 1] through the frozen VAE.

    Latents are divided by `latent_scale` (the factor training multiplied them by) and decoded
    in chunks of `per_device_batch` per local device, since the decoder's activations at full
    resolution are far larger than the diffusion model's. The decoder runs on this process's
    devices only (each process decodes the whole batch), so it needs no cross-host arrays.
    """

    def __init__(
        self,
        model: vae_lib.AutoencoderKL,
        params: Any,
        latent_scale: float,
        per_device_batch: int = 4,
    ):
        self.model = model
        self.latent_scale = float(latent_scale)
        mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
        self.chunk = per_device_batch * mesh.devices.size
        self.params = jax.device_put(params, sharding.replicated(mesh))
        batch = NamedSharding(mesh, PartitionSpec("batch"))

        def decode(params, latents):
            images = model.apply(
                {"params": params}, latents / self.latent_scale, method=model.decode
            )
            return jnp.clip(images, -1.0, 1.0)

        self._decode = jax.jit(decode, in_shardings=(sharding.replicated(mesh), batch))

    def __call__(self, latents: jax.Array | np.ndarray) -> np.ndarray:
        """latents: (B, h, w, c), any B. Returns (B, H, W, out_channels) float32 numpy."""
        latents = np.asarray(jax.device_get(latents), np.float32)
        chunks = []
        for start in range(0, len(latents), self.chunk):
            part = latents[start : start + self.chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], self.chunk - len(part), axis=0)])
            chunks.append(
                np.asarray(jax.device_get(self._decode(self.params, padded)))[: len(part)]
            )
        return np.concatenate(chunks)


def latent_decoder(
    config: ml_collections.ConfigDict, vae_path: str | None = None
) -> LatentDecoder | None:
    """The decoder for a latent-space config (None in pixel space: `data.latent_scale` unset).

    `vae_path` overrides `config.vae.path`.

    Raises:
      ValueError: a latent config without a VAE path, or a VAE whose latent channels differ.
      vae.VAEWeightsNotFoundError / vae.VAEWeightsError: missing or unusable weights.
    """
    if not config.data.latent_scale:
        return None
    vae_config = config.get("vae")  # runs from before the field existed have none
    vae_path = vae_path or (vae_config.path if vae_config is not None else None)
    if not vae_path:
        raise ValueError(
            f"Dataset {config.data.name!r} holds VAE latents (data.latent_scale="
            f"{config.data.latent_scale}), so images need the VAE decoder: set "
            "--config.vae.path=/path/to/sd-vae-ft-ema (launch.sample: --vae=...); "
            "docs/latents.md says where to get it. To train without sample grids, set "
            "--config.sample_every_steps=0."
        )
    model, params = vae_lib.load(os.path.expanduser(vae_path))
    if model.config.latent_channels != config.data.channels:
        raise ValueError(
            f"The VAE in {vae_path} has {model.config.latent_channels} latent channels, the "
            f"config's data.channels is {config.data.channels}: is it the VAE that extracted "
            f"{config.data.name!r}?"
        )
    return LatentDecoder(model, params, config.data.latent_scale)


def clip_denoised_for(config: ml_collections.ConfigDict) -> bool:
    """Whether samplers clip their x_0 estimates to [-1, 1]: `config.sampling.clip_denoised`.

    Gaussian process: unset, pixel-space data (uint8 images mapped to [-1, 1]) clips and latents
    do not. Without the clip, a pixel model's early eps errors, multiplied by up to
    1/sqrt(alpha_bar) = 156 at t = T-1, push deterministic samplers far outside the data range
    (docs/quickstart.md).

    Flow process: never. Its samplers step with the velocity, and its x_0 estimate x - t v carries
    no such amplification; unset gives False, and True is an error rather than ignored.
    """
    clip = config.sampling.get("clip_denoised")
    if train_state.process_name(config) == "flow":
        if clip:
            raise ValueError(
                "config.sampling.clip_denoised=True: the flow samplers do not clip x_0; unset it "
                "(or set it to False) for config.diffusion.process='flow'."
            )
        return False
    return (not config.data.latent_scale) if clip is None else bool(clip)


def make_sample_fn(
    model: nn.Module,
    diffusion: diffusion_lib.Process,
    mesh: Mesh,
    *,
    sampler: str,
    steps: int | str | None,
    cfg_scale: float | None,
    guidance_channels: int | None = None,
    clip_denoised: bool = False,
    decoder: LatentDecoder | None = None,
):
    """Returns `sample(params, rng, labels (B,)) -> (B, H, W, C)` images in [-1, 1].

    `clip_denoised` clips every x_0 estimate to [-1, 1] (pixel-space models; see
    `clip_denoised_for`).

    Without a decoder: the jitted sampler, in model range. With one: the sampled latents go
    through `decoder` (a numpy result of the decoded image shape).
    B must be a multiple of the device count (see `pad_to_devices`). Unconditional models
    ignore `labels` and never use guidance.

    Raises:
      ValueError: `sampler` cannot sample `diffusion` (the message lists the valid ones), here
        rather than at the first call.
    """
    diffusion_lib.check_sampler(diffusion, sampler)
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
            clip_denoised=clip_denoised,
            sharding=batch_sharding,
        )

    sample = jax.jit(sample, out_shardings=sharding.replicated(mesh))
    if decoder is None:
        return sample
    return lambda params, rng, labels: decoder(sample(params, rng, labels))


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
