"""Per-example image preprocessing: ADM's center crop and the uint8 -> [-1, 1] map.

Pure numpy/PIL functions of one example, so they run inside grain workers and are tested alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """ADM's `center_crop_arr` (guided-diffusion, also used by DiT), on a numpy image.

    Halves the image with a BOX filter while its short side is >= 2 * resolution (cheap,
    alias-free downsampling), resizes with BICUBIC so the short side equals resolution, then
    crops the center square.

    Args:
      image: (H, W, C) uint8, C in {1, 3}.
      resolution: output side length.

    Returns:
      (resolution, resolution, C) uint8.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected an (H, W, C) uint8 image, got {image.shape} {image.dtype}.")
    channels = image.shape[-1]
    # PIL wants (H, W) for single-channel images.
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    while min(*pil_image.size) >= 2 * resolution:
        pil_image = pil_image.resize(
            tuple(side // 2 for side in pil_image.size), resample=Image.Resampling.BOX
        )
    scale = resolution / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(side * scale) for side in pil_image.size), resample=Image.Resampling.BICUBIC
    )
    array = np.asarray(pil_image).reshape(pil_image.size[1], pil_image.size[0], channels)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]; float inputs (e.g. cached VAE latents) pass through.

    image: (H, W, C) uint8 or float. Returns (H, W, C) float32.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 127.5 - 1.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32)
    raise ValueError(f"Expected uint8 pixels or float latents, got dtype {image.dtype}.")
