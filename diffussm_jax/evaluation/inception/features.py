"""Batched feature extraction: uint8 images -> the activations ADM's metrics take."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import jax
import numpy as np

from diffussm_jax.evaluation.inception.network import INPUT_SIZE, InceptionV3
from diffussm_jax.evaluation.inception.preprocessing import preprocess
from diffussm_jax.evaluation.inception.weights import load_variables


@functools.lru_cache(maxsize=4)
def _feature_fn(include_fc: bool, preprocessing: str, size: int):
    """Jitted (variables, uint8 images) -> activations, shared by extractors (one compile)."""
    model = InceptionV3(include_fc=include_fc)

    def features(variables, images):
        outputs = model.apply(variables, preprocess(images, mode=preprocessing, size=size))
        spatial = outputs["mixed_6"][..., :7]  # ADM's spatial[..., :7]
        result = {"pool": outputs["pool"], "spatial": spatial.reshape(len(images), -1)}
        if include_fc:
            result["adm_logits"] = outputs["adm_logits"]
        return result

    return jax.jit(features)


class InceptionFeatures:
    """Runs the FID Inception on uint8 images in fixed-size jitted batches.

        extractor = InceptionFeatures.from_file("inception_fid.npz")
        activations = extractor(images)   # images (N, H, W, 3) uint8
        activations["pool"]   (N, 2048) float32   FID, precision/recall
        activations["spatial"] (N, 2023) float32  sFID: mixed_6 first 7 channels, flattened HWC
        activations["adm_logits"] (N, 1008)       IS as ADM computes it (if weights have fc)

    The batch is padded to `batch_size`, so any N compiles once. It runs on the default device
    (about 5.7 G multiply-adds per image, against hundreds of model calls per sample).
    """

    def __init__(
        self,
        variables: dict,
        *,
        include_fc: bool = True,
        batch_size: int = 200,
        preprocessing: str = "pytorch_fid",
    ):
        self.variables = variables
        self.include_fc = include_fc
        self.batch_size = batch_size
        # Read at construction so tests can run the same graph at a smaller size (>= 75 px).
        self._features = _feature_fn(include_fc, preprocessing, INPUT_SIZE)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> InceptionFeatures:
        variables, include_fc = load_variables(path)
        return cls(variables, include_fc=include_fc, **kwargs)

    def __call__(self, images: np.ndarray | Iterable[np.ndarray]) -> dict[str, np.ndarray]:
        """(N, H, W, C) uint8 images, or an iterable of such batches -> activations (N, ...)."""
        batches = [images] if isinstance(images, np.ndarray) else images
        chunks: dict[str, list[np.ndarray]] = {}
        for batch in batches:
            batch = np.asarray(batch)
            if batch.dtype != np.uint8 or batch.ndim != 4:
                raise ValueError(
                    f"Expected uint8 (N, H, W, C) images, got {batch.dtype} {batch.shape}."
                )
            for start in range(0, len(batch), self.batch_size):
                part = batch[start : start + self.batch_size]
                padded = np.zeros((self.batch_size, *part.shape[1:]), np.uint8)
                padded[: len(part)] = part
                outputs = jax.device_get(self._features(self.variables, padded))
                for name, value in outputs.items():
                    chunks.setdefault(name, []).append(np.asarray(value[: len(part)], np.float32))
        if not chunks:
            raise ValueError("No images to run Inception on.")
        return {name: np.concatenate(values) for name, values in chunks.items()}
