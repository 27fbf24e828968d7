"""The sample function: a jitted sampler of a model and process, sharded over the mesh.

Latent models sample latents; given a `vae.LatentDecoder`, the sample function decodes them, so
every caller gets (B, H, W, C) images in [-1, 1] whatever space the model works in:

    sample_fn = make_sample_fn(model, diffusion, mesh, sampler="ddpm", steps=250, cfg_scale=1.5,
                               decoder=vae.latent_decoder(config))
    images = sampling.draw(sample_fn, params, rng, labels, mesh)
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax import parallel
from diffussm_jax.vae.codec import LatentDecoder


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
    `training.clip_denoised_for`).

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
    batch_sharding = parallel.batch_sharding(mesh)

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

    sample = jax.jit(sample, out_shardings=parallel.replicated(mesh))
    if decoder is None:
        return sample
    return lambda params, rng, labels: decoder(sample(params, rng, labels))
