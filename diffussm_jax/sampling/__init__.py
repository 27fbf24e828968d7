"""Sampling a trained model: the sample function, drawing in batches, and grids.

    sample.py   `make_sample_fn`: a model and a diffusion process -> a jitted, sharded sampler
                (latent models decode through `vae.codec.LatentDecoder`)
    batched.py  `draw` (labels padded to the devices) and `BatchedDraw` (many samples in batches
                of one compiled size, one noise key per batch, uint8 out)
    grids.py    the labels of a class grid, the grid image and its PNG

The samplers themselves (DDPM, DDIM, DPM-Solver++, Euler, Heun) are pure functions of the model
in `diffussm_jax.diffusion`; this package binds them to parameters and devices.
"""

from diffussm_jax.sampling.batched import BatchedDraw, draw, pad_to_devices
from diffussm_jax.sampling.grids import grid_labels, image_grid, save_png
from diffussm_jax.sampling.sample import make_sample_fn

__all__ = [
    "BatchedDraw",
    "draw",
    "grid_labels",
    "image_grid",
    "make_sample_fn",
    "pad_to_devices",
    "save_png",
]
