"""Images -> the Inception input: resize to 299 x 299 and map pixels to about [-1, 1].

`preprocess` turns uint8 images of any size into the network input, by default exactly as
pytorch-fid does (`mode="pytorch_fid"`: x / 255, PyTorch bilinear resize to 299 x 299, 2x - 1).
The TF graph that ADM's evaluator runs resizes differently (TF1's legacy bilinear kernel, no
half-pixel centres) and maps pixels by (x - 128) / 128; `mode="tf_graph"` does that instead and
is what `launch.evaluate` uses, to come as close to ADM's numbers as a port can. Report ADM's own
evaluator for comparisons with papers (docs/evaluation.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax.evaluation.inception.network import INPUT_SIZE


def bilinear_resize_matrix(in_size: int, out_size: int, mode: str = "pytorch") -> np.ndarray:
    """(out_size, in_size) float64 matrix M with resized = M @ signal, for one axis.

    mode "pytorch": `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`:
      source coordinate (i + 0.5) * in / out - 0.5, clamped below at 0.
    mode "tf1": TF1's `ResizeBilinear(align_corners=False)` without half-pixel centres, which
      the 2015 Inception graph applies: source coordinate i * in / out.
    Both interpolate between floor(src) and floor(src) + 1, clamped to the last pixel.
    """
    scale = in_size / out_size
    destination = np.arange(out_size, dtype=np.float64)
    if mode == "pytorch":
        source = np.maximum((destination + 0.5) * scale - 0.5, 0.0)
    elif mode == "tf1":
        source = destination * scale
    else:
        raise ValueError(f"Unknown resize mode {mode!r}; use 'pytorch' or 'tf1'.")
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight_upper = source - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lower), 1.0 - weight_upper)
    np.add.at(matrix, (np.arange(out_size), upper), weight_upper)
    return matrix


PREPROCESSING = ("pytorch_fid", "tf_graph")


def preprocess(
    images: jax.Array, *, mode: str = "pytorch_fid", size: int | None = None
) -> jax.Array:
    """uint8 (or [0, 1] float) images -> the Inception input, resized to `size` x `size`.

    mode "pytorch_fid" (pytorch-fid's `InceptionV3.forward`, resize_input + normalize_input):
      x / 255, PyTorch's bilinear resize (`F.interpolate(align_corners=False)`, no
      antialiasing), then 2x - 1.
    mode "tf_graph" (what the 2015 TF graph run by ADM's evaluator does to its uint8 input, as
      torch-fidelity reproduces it): TF1's legacy bilinear resize (no half-pixel centres) of the
      0..255 values, then (x - 128) / 128.

    Args:
      images: (B, H, W, C) with C = 3, or C = 1 (grey, repeated to 3 channels); uint8, or float
        in [0, 1] (pytorch-fid's float convention).
      mode: see above.
      size: output side; None: `INPUT_SIZE` (299, what every reported number uses).

    Returns:
      (B, size, size, 3) float32, about [-1, 1].
    """
    if mode not in PREPROCESSING:
        raise ValueError(f"Unknown preprocessing {mode!r}; use one of {PREPROCESSING}.")
    size = size or INPUT_SIZE
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Expected (B, H, W, 1 or 3) images, got shape {images.shape}.")
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    images = images.astype(jnp.float32)
    if mode == "tf_graph":
        images = images * 255.0
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    _, height, width, _ = images.shape
    if (height, width) != (size, size):
        # Separable resize as two small matmuls: the exact interpolation weights, and no
        # antialiasing (jax.image.resize would antialias when downsampling 512px images).
        kind = "pytorch" if mode == "pytorch_fid" else "tf1"
        rows = jnp.asarray(bilinear_resize_matrix(height, size, kind), jnp.float32)
        cols = jnp.asarray(bilinear_resize_matrix(width, size, kind), jnp.float32)
        images = jnp.einsum(
            "oh,bhwc,pw->bopc", rows, images, cols, precision=jax.lax.Precision.HIGHEST
        )
    if mode == "tf_graph":
        return (images - 128.0) / 128.0
    return 2.0 * images - 1.0
