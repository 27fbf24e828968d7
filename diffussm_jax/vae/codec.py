"""The latent codec: images <-> the scaled latents a latent diffusion model works in.

    encode = make_encode_fn(model, mesh)             # uint8 images -> posterior means (latents)
    decoder = LatentDecoder(model, params, latent_scale=0.18215)
    images = decoder(latents)                        # scaled latents -> images in [-1, 1]

Encoding runs once, when a latent dataset is extracted (`data.latents`); decoding runs whenever
a latent model's samples become images (`sampling`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffussm_jax import parallel
from diffussm_jax.vae import autoencoder


def make_encode_fn(model: autoencoder.AutoencoderKL, mesh: Mesh):
    """Jitted `encode(params, images (B, R, R, 3) uint8) -> posterior means (B, R/f, R/f, c)`.

    B must be a multiple of the mesh size; the batch is split over the mesh's devices.
    """
    batch = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    replicated = NamedSharding(mesh, PartitionSpec())

    @functools.partial(jax.jit, in_shardings=(replicated, batch), out_shardings=batch)
    def encode(params, images):
        pixels = images.astype(jnp.float32) / 127.5 - 1.0
        mean, _ = model.apply({"params": params}, pixels, method=model.encode)
        return mean

    return encode


class LatentDecoder:
    """Scaled latents (B, h, w, c) -> images (B, h*f, w*f, 3) in [-1, 1] through the frozen VAE.

    Latents are divided by `latent_scale` (the factor training multiplied them by) and decoded
    in chunks of `per_device_batch` per local device, since the decoder's activations at full
    resolution are far larger than the diffusion model's. The decoder runs on this process's
    devices only (each process decodes the whole batch), so it needs no cross-host arrays.
    """

    def __init__(
        self,
        model: autoencoder.AutoencoderKL,
        params: Any,
        latent_scale: float,
        per_device_batch: int = 4,
    ):
        self.model = model
        self.latent_scale = float(latent_scale)
        mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
        self.chunk = per_device_batch * mesh.devices.size
        self.params = jax.device_put(params, parallel.replicated(mesh))
        batch = NamedSharding(mesh, PartitionSpec("batch"))

        def decode(params, latents):
            images = model.apply(
                {"params": params}, latents / self.latent_scale, method=model.decode
            )
            return jnp.clip(images, -1.0, 1.0)

        self._decode = jax.jit(decode, in_shardings=(parallel.replicated(mesh), batch))

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
