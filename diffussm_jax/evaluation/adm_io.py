"""ADM's evaluation files: the sample-batch protocol (labels, uint8 pixels) and reference batches.

What DiT's `sample_ddp.py` writes and ADM's `evaluations/evaluator.py` reads:

    draw_labels                   the class labels of the samples (uniform draws for FID)
    to_uint8                      the pixel quantisation of every sample file and PNG we write
    save_sample_batch[_streamed]  `arr_0` uint8 (N, H, W, C) and optional `arr_1` labels
    load_reference_batch          `mu`/`sigma`, `mu_s`/`sigma_s`, `arr_0` of a reference .npz

Every .npz is read with `allow_pickle=False`; the formulas that score these arrays are in
`metrics`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterable

import numpy as np

from diffussm_jax import files

# Class labels of evaluation samples: uniform draws (the FID protocol) or cycling.
LABEL_MODES = ("uniform", "balanced")


# ---------------------------------------------------------------------------------------------
# Samples: labels, uint8 pixels, sample batches


def draw_labels(num_samples: int, num_classes: int, seed: int, mode: str) -> np.ndarray:
    """(num_samples,) int32 class labels: uniform draws (the FID protocol) or cycling.

    Unconditional models (num_classes = 0) get zeros, which the sampler ignores.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {mode!r}.")
    if num_classes == 0:
        return np.zeros(num_samples, np.int32)
    if mode == "balanced":
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)


# How `to_uint8` quantises, in the words recorded beside every sample file.
UINT8_RULE = "floor(127.5 x + 128) = round((x + 1) * 127.5) halves up, clipped to [0, 255]"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model-range images -> uint8 pixels: the one quantisation rule of the whole project.

    pixel = clip(floor(127.5 * x + 128), 0, 255), computed in float64. That is
    round((x + 1) * 127.5) with exact halves rounded up (not to even), then clipped to
    [0, 255]; it equals DiT's `clamp(127.5 * x + 128, 0, 255).to(uint8)` in sample_ddp.py, so
    sample files score as DiT's do. x = -1 -> 0, 0 -> 128, 1 -> 255 (1 + 1/255 -> 255 too).

    Args:
      images: (..., H, W, C) float, nominally in [-1, 1].

    Returns:
      The same shape, uint8.

    Raises:
      ValueError: any NaN or infinite value (a diverged sampler cannot be scored).
    """
    images = np.asarray(images, dtype=np.float64)
    if not np.isfinite(images).all():
        raise ValueError("images have non-finite values; a diverged sampler cannot be scored.")
    return np.clip(np.floor(images * 127.5 + 128.0), 0, 255).astype(np.uint8)


def save_sample_batch(
    path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None
) -> None:
    """Writes samples in ADM's format: `arr_0` uint8 (N, H, W, C), `arr_1` labels if given.

    Args:
      path: output .npz path, what ADM's `evaluator.py` takes as `sample_batch`.
      images: (N, H, W, C) uint8 (see `to_uint8`).
      labels: optional (N,) int class labels.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be ({images.shape[0]},) ints, got {labels.shape}.")
        arrays["arr_1"] = labels
    files.save_npz(path, **arrays)


def save_sample_batch_streamed(
    path: str | os.PathLike,
    chunks: Iterable[np.ndarray],
    shape: tuple[int, int, int, int],
    labels: np.ndarray | None = None,
) -> None:
    """Writes `save_sample_batch`'s file from chunks, holding one chunk in memory at a time.

    50,000 ImageNet-256 samples are 9.8 GB of uint8; this writes the .npy member of the zip
    archive header-first and appends each chunk, so the file equals `np.savez(arr_0=...)`'s
    content without the concatenated array ever existing. Written to a temporary name and
    renamed, so an interrupted write never leaves a truncated sample file.

    Args:
      path: output .npz path.
      chunks: uint8 (n_i, H, W, C) arrays whose counts sum to shape[0].
      shape: (N, H, W, C) of the whole batch.
      labels: optional (N,) int labels, stored as `arr_1`.
    """
    path = os.fspath(path)
    shape = tuple(int(x) for x in shape)
    # Built in a local file (a zip archive needs seeks), then renamed or uploaded whole.
    temporary = files.local_temporary(path)
    written = 0
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                      "fortran_order": False, "shape": shape}  # fmt: skip
            # Version 1.0, as np.savez writes it and ADM's streaming reader expects.
            np.lib.format.write_array_header_1_0(member, header)
            for chunk in chunks:
                chunk = np.asarray(chunk)
                if chunk.dtype != np.uint8 or chunk.shape[1:] != shape[1:]:
                    raise ValueError(
                        f"chunk {chunk.dtype} {chunk.shape} does not fit uint8 {shape}."
                    )
                member.write(np.ascontiguousarray(chunk).tobytes())
                written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"chunks hold {written} images, expected {shape[0]}.")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be ({shape[0]},) ints, got {labels.shape}.")
            with archive.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels, allow_pickle=False)
    files.publish(temporary, path)


# ---------------------------------------------------------------------------------------------
# Reference batches


@dataclasses.dataclass(frozen=True)
class ReferenceBatch:
    """Contents of an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz).

    Attributes:
      path: the file it came from.
      pool_statistics: (mu (2048,), sigma (2048, 2048)) float64 from `mu`/`sigma`, or None.
      spatial_statistics: (mu_s, sigma_s) float64 for sFID, or None.
      images: (M, H, W, C) uint8 `arr_0`, or None (absent, or not requested). Precision and
        recall need the Inception features of these images; FID/sFID can use the statistics.
    """

    path: str
    pool_statistics: tuple[np.ndarray, np.ndarray] | None
    spatial_statistics: tuple[np.ndarray, np.ndarray] | None
    images: np.ndarray | None


def _read_statistics(npz, path: str, mean_key: str, cov_key: str):
    if mean_key not in npz.files:
        return None
    if cov_key not in npz.files:
        raise ValueError(f"{path} has {mean_key!r} but no {cov_key!r}.")
    mu = np.asarray(npz[mean_key], dtype=np.float64)
    sigma = np.asarray(npz[cov_key], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{path}: {mean_key} {mu.shape} and {cov_key} {sigma.shape} are not (D,) and (D, D)."
        )
    return mu, sigma


def load_reference_batch(path: str | os.PathLike, *, load_images: bool = True) -> ReferenceBatch:
    """Reads an ADM-style reference or sample `.npz` without unpickling anything.

    Args:
      path: .npz with `mu`, `sigma` (pool statistics), optionally `mu_s`, `sigma_s` (spatial),
        and/or `arr_0` (uint8 NHWC images). Object (pickled) arrays are rejected.
      load_images: read `arr_0` into memory (1.9 GB for the ImageNet-256 reference batch).

    Returns:
      A `ReferenceBatch`; fields absent from the file are None.

    Raises:
      ValueError: a pickled array, missing content, or wrong shapes / dtypes.
    """
    path = os.fspath(path)
    try:
        with files.open(path, "rb") as file, np.load(file, allow_pickle=False) as npz:
            pool = _read_statistics(npz, path, "mu", "sigma")
            spatial = _read_statistics(npz, path, "mu_s", "sigma_s")
            images = None
            if load_images and "arr_0" in npz.files:
                images = npz["arr_0"]
                if images.dtype != np.uint8 or images.ndim != 4:
                    raise ValueError(
                        f"{path}: arr_0 must be uint8 (N, H, W, C), got {images.dtype} "
                        f"{images.shape}."
                    )
            has_images = "arr_0" in npz.files
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(
                f"{path} holds a pickled (object) array; refusing to unpickle it. Reference "
                "batches contain only numeric arrays."
            ) from error
        raise
    if pool is None and not has_images:
        raise ValueError(f"{path} has neither 'mu'/'sigma' statistics nor 'arr_0' images.")
    return ReferenceBatch(path, pool, spatial, images)
