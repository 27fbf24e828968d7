"""Sample grids: which labels a grid shows, the grid image, and its PNG file."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from diffussm_jax import files


def grid_labels(num_classes: int, classes_in_grid: int, per_class: int) -> np.ndarray:
    """Row r of the grid holds class r (classes spread evenly over all classes)."""
    shown = np.linspace(0, num_classes - 1, min(classes_in_grid, num_classes)).round()
    return np.repeat(shown.astype(np.int32), per_class)


def image_grid(images: np.ndarray, rows: int, padding: int = 2, min_cell: int = 48) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(sH+p)+p, cols*(sW+p)+p, C) image, filled row by row.

    Images smaller than `min_cell` pixels are enlarged by the integer factor s (nearest
    neighbour) that makes them at least that big, so a grid of 16x16 digits is worth looking at.
    """
    scale = max(1, -(-min_cell // max(images.shape[1:3])))
    images = np.repeat(np.repeat(np.asarray(images), scale, axis=1), scale, axis=2)
    count, height, width, channels = images.shape
    cols = -(-count // rows)
    grid = np.zeros(
        (rows * (height + padding) + padding, cols * (width + padding) + padding, channels),
        np.uint8,
    )
    for index, image in enumerate(images):
        r, c = divmod(index, cols)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """(H, W, C) uint8 with C in {1, 3} -> PNG, written atomically (`files.write_atomically`)."""
    image = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    files.write_atomically(path, buffer.getvalue())
