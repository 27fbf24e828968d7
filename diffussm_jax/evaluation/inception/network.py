"""The FID Inception-V3 network: pytorch-fid's FID variant of Inception-V3, in Flax.

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
state dict is a transpose per tensor (`weights.convert_state_dict`).

Outputs of `InceptionV3.__call__` (a dict), for inputs already at 299 x 299 in [-1, 1]
(`preprocessing.preprocess`):

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
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
BATCHNORM_EPS = 1e-3

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
