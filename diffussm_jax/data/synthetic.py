"""Two-class synthetic images whose class is a simple statistic of the pixels.

Class 0 has the left half bright and the right half dark, class 1 the reverse, each image with
its own brightness and a little noise. A class-conditional model that draws the class it is asked
for yields samples whose `left_minus_right` has the class's sign; one that ignores labels gets the
sign wrong half the time. Learning it needs the labels to reach the network and positional
information (which half is left), so it checks both in seconds (tests/test_learning.py,
scripts/halves_study.py).
"""

from __future__ import annotations

import numpy as np


def two_halves(count: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(count, size, size, 1) float32 images in [-1, 1] and their (count,) int32 labels.

    Pixels are +b on the bright half and -b on the dark one, b ~ U(0.5, 1) per image, plus
    normal noise of std 0.05, clipped to [-1, 1].
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count).astype(np.int32)
    brightness = rng.uniform(0.5, 1.0, (count, 1, 1, 1))
    left = np.where(np.arange(size) < size // 2, 1.0, -1.0)
    bright_left = np.broadcast_to(left[None, None, :, None], (1, size, size, 1))
    images = np.where(labels[:, None, None, None] == 0, bright_left, -bright_left) * brightness
    images = images + 0.05 * rng.normal(size=images.shape)
    return np.clip(images, -1.0, 1.0).astype(np.float32), labels


def left_minus_right(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N,): mean of the left half minus mean of the right half.

    About +1.5 for class 0 and -1.5 for class 1 (2 b); near 0 for noise or a blend.
    """
    half = images.shape[2] // 2
    images = np.asarray(images, np.float64)
    return images[:, :, :half].mean((1, 2, 3)) - images[:, :, half:].mean((1, 2, 3))


def within_half_std(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (2N,): the pixel std inside each half (0.05 for the data: its noise)."""
    half = images.shape[2] // 2
    images = np.asarray(images, np.float64)
    return np.concatenate([images[:, :, :half].std((1, 2, 3)), images[:, :, half:].std((1, 2, 3))])
