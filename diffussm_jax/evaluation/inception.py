"""Inception-V3 for FID, sFID, IS and precision/recall: the FID variant of pytorch-fid, in Flax.

FID numbers are only comparable when they come from one network: the TensorFlow graph
`inception-2015-12-05` (`classify_image_graph_def.pb`) that TTUR's FID, ADM's evaluator and
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` port all use. That graph differs from
torchvision's Inception-V3 in three places, reproduced here as pytorch-fid's FIDInception*
blocks do:

  * the average pools inside Mixed_5b..5d, 6b..6e and 7b leave the zero padding out of the mean
    (`count_include_pad=False`, TensorFlow's behaviour);
  * the pool branch of the last block (Mixed_7c) is a 3x3 max pool, not an average pool;
  * the classifier has 1008 outputs (1000 ImageNet classes and 8 unused ones).

Every convolution is `BasicConv2d`: conv without bias, BatchNorm (eps 1e-3, running statistics
only: this network is never trained here), ReLU. Layouts are NHWC; parameter names follow
torchvision's module names (`Mixed_6d/branch1x1/conv/kernel`), so conversion from a PyTorch
state dict is a transpose per tensor (`convert_state_dict`).

Outputs of `InceptionV3.__call__` (a dict), for inputs already at 299 x 299 in [-1, 1]:

  pool        (B, 2048)  the final 8x8 average pool: TF `pool_3:0`, pytorch-fid's block 3.
                         FID and precision/recall use it.
  mixed_6     (B, 17, 17, 192)  TF `mixed_6/conv:0`, the ReLU output of the 1x1 branch of the
                         seventh mixed block. TF numbers its mixed blocks from 0 (mixed, mixed_1,
                         ..., mixed_10 = torchvision's Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, ...), so
                         mixed_6 is Mixed_6d and its scope `conv` is `branch1x1` (a BasicConv2d;
                         the op named after the scope is its ReLU). ADM's sFID keeps its first
                         7 channels: `metrics.sfid_features`.
  logits      (B, 1008)  the fc layer with its bias (torchvision's `fc`).
  adm_logits  (B, 1008)  `pool @ fc.kernel` without the bias: ADM's `_create_softmax_graph`
                         multiplies pool_3 by the MatMul weight of `softmax/logits` only, and its
                         Inception Score is the softmax of these.

`preprocess` turns uint8 images of any size into the network input, by default exactly as
pytorch-fid does (`mode="pytorch_fid"`: x / 255, PyTorch bilinear resize to 299 x 299, 2x - 1).
The TF graph that ADM's evaluator runs resizes differently (TF1's legacy bilinear kernel, no
half-pixel centres) and maps pixels by (x - 128) / 128; `mode="tf_graph"` does that instead and
is what `launch.evaluate` uses, to come as close to ADM's numbers as a port can. Report ADM's own
evaluator for comparisons with papers (docs/evaluation.md).

Weights: `launch/convert_inception.py` converts the public PyTorch file to .npz or .safetensors;
`load_variables` reads it back without unpickling anything and checks every tensor's name, shape
and finiteness against this module.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffussm_jax import files

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
BATCHNORM_EPS = 1e-3
# The public weights of the FID Inception (pytorch-fid's port of the 2015-12-05 TF graph).
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(height: int, width: int) -> Padding:
    return ((height, height), (width, width))


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU.

    (B, H, W, C) -> (B, H', W', features).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: Padding = ((0, 0), (0, 0))
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCHNORM_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool over the unpadded pixels only (TF's SAME average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: (B, 35, 35, C) -> (B, 35, 35, 224 + pool_features)."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = conv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): (B, 35, 35, 288) -> (B, 17, 17, 768)."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_stride2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e (factorised 7x7): (B, 17, 17, 768) -> (B, 17, 17, 768).

    Returns the block output and its 1x1 branch (`mixed_N/conv` in TF), which sFID reads.
    """

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = conv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(branch7x7)
        dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        dbl = conv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(dbl)
        dbl = conv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(dbl)
        dbl = conv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(dbl)
        dbl = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_5")(dbl)
        branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        out = jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)
        return out, branch1x1


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): (B, 17, 17, 768) -> (B, 8, 8, 1280)."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_stride2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b / 7c (expanded filter banks): (B, 8, 8, C) -> (B, 8, 8, 2048).

    `max_pool`: the FID graph's Mixed_7c pools its last branch with a max pool (Mixed_7b, like
    every other block, with a padding-excluding average).
    """

    max_pool: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(branch3x3),
                conv(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        dbl = conv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate(
            [
                conv(384, (1, 3), padding=_pad(0, 1), name="branch3x3dbl_3a")(dbl),
                conv(384, (3, 1), padding=_pad(1, 0), name="branch3x3dbl_3b")(dbl),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
        else:
            pooled = _avg_pool_same(x)
        branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-V3; see the module docstring for the outputs.

    Attributes:
      include_fc: build the 1008-way classifier (needed for `logits` / the Inception Score).
        Weights converted from pytorch-fid's feature extractor (`InceptionV3` wrapper) have none.
      precision: of convolutions and the classifier. HIGHEST keeps float32 on GPUs and TPUs,
        whose default would round the operands to TF32 / bfloat16 and shift FID.
    """

    include_fc: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """x: (B, 299, 299, 3) float in [-1, 1] (see `preprocess`) -> dict of features."""
        conv = functools.partial(BasicConv2d, precision=self.precision)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # (B, 149, 149, 32)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # (B, 147, 147, 32)
        x = conv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_stride2(x)  # (B, 73, 73, 64)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # (B, 71, 71, 192)
        x = _max_pool_stride2(x)  # (B, 35, 35, 192)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, self.precision, name=name)(x)
        x = InceptionB(self.precision, name="Mixed_6a")(x)  # (B, 17, 17, 768)
        mixed_6 = None
        for name, channels_7x7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x, branch1x1 = FIDInceptionC(channels_7x7, self.precision, name=name)(x)
            if name == "Mixed_6d":  # TF's mixed_6 (see the module docstring)
                mixed_6 = branch1x1
        x = InceptionD(self.precision, name="Mixed_7a")(x)  # (B, 8, 8, 1280)
        x = FIDInceptionE(max_pool=False, precision=self.precision, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, precision=self.precision, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))  # (B, 2048)
        outputs = {"pool": pool, "mixed_6": mixed_6}
        if self.include_fc:
            fc = nn.Dense(NUM_LOGITS, precision=self.precision, name="fc")
            outputs["logits"] = fc(pool)
            kernel = fc.variables["params"]["kernel"]
            outputs["adm_logits"] = jnp.matmul(pool, kernel, precision=self.precision)
        return outputs


# ---------------------------------------------------------------------------------------------
# Input preprocessing


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


# ---------------------------------------------------------------------------------------------
# Weights: conversion from PyTorch names, files, checks


class InceptionWeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the network."""


def _strip_wrapper_prefix(name: str) -> str:
    """pytorch-fid's `InceptionV3` wrapper stores `blocks.<i>.<j>.` before torchvision's names."""
    wrapper_blocks = (
        ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
        ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
        (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
        ),
        ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
    )
    if name.startswith("blocks."):
        _, block, layer, rest = name.split(".", 3)
        return f"{wrapper_blocks[int(block)][int(layer)]}.{rest}"
    return name


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PyTorch FID-Inception state dict -> flat `{"params/...": array, "batch_stats/...": array}`.

    Accepts torchvision names (`Mixed_6d.branch1x1.conv.weight`, as in the public
    pt_inception-2015-12-05 file) or pytorch-fid's wrapper names (`blocks.2.6.branch1x1...`,
    which have no fc). Conv weights (O, I, kh, kw) become Flax kernels (kh, kw, I, O); Linear
    weights (O, I) become (I, O); BatchNorm weight/bias/running_mean/running_var become
    scale/bias (params) and mean/var (batch_stats); `num_batches_tracked` is dropped.

    Args:
      state_dict: name -> tensor or array (anything `np.asarray` takes; torch tensors on CPU).

    Returns:
      float32 arrays keyed by '/'-joined Flax paths.
    """
    flat: dict[str, np.ndarray] = {}
    for raw_name, tensor in state_dict.items():
        name = _strip_wrapper_prefix(raw_name)
        *modules, leaf = name.split(".")
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor)
        value = value.astype(np.float32)
        path = "/".join(modules)
        if modules and modules[-1] == "conv" and leaf == "weight":
            if value.ndim != 4:
                raise InceptionWeightsError(
                    f"{raw_name}: expected a 4-D conv weight, got {value.shape}."
                )
            flat[f"params/{path}/kernel"] = value.transpose(2, 3, 1, 0)
        elif modules and modules[-1] == "bn":
            target = {
                "weight": "params/{}/scale",
                "bias": "params/{}/bias",
                "running_mean": "batch_stats/{}/mean",
                "running_var": "batch_stats/{}/var",
            }.get(leaf)
            if target is None:
                raise InceptionWeightsError(f"Unexpected BatchNorm tensor {raw_name}.")
            flat[target.format(path)] = value
        elif modules == ["fc"] and leaf == "weight":
            flat["params/fc/kernel"] = value.T
        elif modules == ["fc"] and leaf == "bias":
            flat["params/fc/bias"] = value
        elif modules and modules[0] == "AuxLogits":
            continue  # torchvision's auxiliary classifier is not part of the FID graph
        else:
            raise InceptionWeightsError(
                f"Unexpected tensor {raw_name} {value.shape}: not a FID Inception-V3 state dict?"
            )
    return flat


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch FID-Inception .pth with `torch.load(weights_only=True)` and converts it.

    Needs torch (the `reference` extra). The file may hold a state dict directly or under a
    "state_dict" key.
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Converting PyTorch weights needs torch: pip install -e '.[reference]'."
        ) from error
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Download {FID_WEIGHTS_FILENAME} from pytorch-fid's GitHub "
            "releases (see docs/evaluation.md) and pass its path."
        )
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InceptionWeightsError(
            f"{path} is not a readable PyTorch weights file ({type(error).__name__}: {error})."
        ) from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise InceptionWeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict.")
    return convert_state_dict(loaded)


def convert_checkpoint(input_path: str | os.PathLike, output_path: str | os.PathLike) -> dict:
    """Converts a PyTorch FID-Inception .pth to .npz / .safetensors; returns a short summary.

    The output is checked against the network before it is written (`save_variables`).
    """
    flat = load_torch_checkpoint(input_path)
    save_variables(output_path, flat)
    return {
        "output": os.fspath(output_path),
        "tensors": len(flat),
        "parameters": int(
            sum(value.size for name, value in flat.items() if name.startswith("params/"))
        ),
        "include_fc": "params/fc/kernel" in flat,
    }


def expected_shapes(include_fc: bool = True) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of every variable of `InceptionV3(include_fc)`, without computing."""
    return dict(_expected_shapes(include_fc))


@functools.lru_cache(maxsize=2)
def _expected_shapes(include_fc: bool) -> dict[str, tuple[int, ...]]:
    abstract = jax.eval_shape(
        InceptionV3(include_fc=include_fc).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    flat = traverse_util.flatten_dict(abstract, sep="/")
    return {name: tuple(value.shape) for name, value in flat.items()}


def save_variables(path: str | os.PathLike, flat: Mapping[str, np.ndarray]) -> None:
    """Writes flat variables to .npz or .safetensors (by extension), atomically.

    The names and shapes are checked first (`check_variables`), so a written file always loads.
    """
    path = os.fspath(path)
    check_variables(flat, path)
    arrays = {name: np.ascontiguousarray(value, np.float32) for name, value in flat.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save

        files.write_atomically(path, save(arrays))
    elif path.endswith(".npz"):
        files.save_npz(path, **arrays)
    else:
        raise ValueError(f"{path}: the output name must end in .npz or .safetensors.")


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        try:
            from safetensors import SafetensorError
            from safetensors.numpy import load
        except ImportError as error:
            raise ImportError(
                f"Reading {path} needs the safetensors package (pip install safetensors), or "
                "convert the weights to .npz instead."
            ) from error
        try:
            return load(files.read_bytes(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise InceptionWeightsError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated. "
                "Re-run launch/convert_inception.py."
            ) from error
    with files.open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise InceptionWeightsError(
            f"{path} is not a readable .npz file (it is not a zip archive); it may be corrupt. "
            "Re-run launch/convert_inception.py."
        )
    try:
        return files.load_npz(path)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InceptionWeightsError(
                f"{path} holds a pickled (object) array; refusing to unpickle it."
            ) from error
        raise InceptionWeightsError(f"{path} is not a readable .npz file ({error}).") from error
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InceptionWeightsError(
            f"{path} is not a readable .npz file ({type(error).__name__}: {error}); it may be "
            "truncated or corrupt. Re-run launch/convert_inception.py."
        ) from error


def check_variables(flat: Mapping[str, np.ndarray], source: str = "weights") -> bool:
    """Checks flat variables against the network; returns whether they include the classifier.

    Raises:
      InceptionWeightsError: naming missing, unexpected, mis-shaped or non-finite tensors.
    """
    include_fc = "params/fc/kernel" in flat or "params/fc/bias" in flat
    expected = expected_shapes(include_fc)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{source} does not match the FID Inception-V3: {len(missing)} missing tensors "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Convert "
            f"{FID_WEIGHTS_FILENAME} with launch/convert_inception.py."
        )
    for name, shape in expected.items():
        value = flat[name]
        if tuple(value.shape) != shape:
            raise InceptionWeightsError(
                f"{source}: {name} has shape {tuple(value.shape)}, the network needs {shape}."
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise InceptionWeightsError(f"{source}: {name} has dtype {value.dtype}, not float.")
        if not np.isfinite(value).all():
            raise InceptionWeightsError(f"{source}: {name} has non-finite values.")
    return include_fc


def load_variables(path: str | os.PathLike) -> tuple[dict, bool]:
    """Reads converted weights (.npz or .safetensors) and checks them against the network.

    Returns:
      (variables {"params": ..., "batch_stats": ...} of float32 jax arrays, include_fc).

    Raises:
      FileNotFoundError: no file at `path` (the message says how to make one).
      InceptionWeightsError: unreadable, corrupt, or not this network's weights.
    """
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(
            f"Inception weights {path} not found. Convert {FID_WEIGHTS_FILENAME} first: "
            "python -m launch.convert_inception --input=<.pth> --output=<.npz> "
            "(docs/evaluation.md)."
        )
    flat = _read_file(path)
    include_fc = check_variables(flat, path)
    arrays = {name: jnp.asarray(value, jnp.float32) for name, value in flat.items()}
    return traverse_util.unflatten_dict(arrays, sep="/"), include_fc


# ---------------------------------------------------------------------------------------------
# Batched feature extraction


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
