"""Stable Diffusion's KL autoencoder (AutoencoderKL, "KL-f8") as Flax Linen modules, NHWC.

The architecture of diffusers' `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D`
blocks, which is what `stabilityai/sd-vae-ft-ema` (the paper's frozen VAE) uses:

    encoder: conv_in -> [ResnetBlock x layers_per_block (+ stride-2 downsample)] per width
             -> mid (ResnetBlock, single-head self-attention, ResnetBlock)
             -> GroupNorm, SiLU, conv_out (2 * latent_channels: mean and log-variance)
             -> quant_conv (1x1)
    decoder: post_quant_conv (1x1) -> conv_in -> mid
             -> [ResnetBlock x (layers_per_block + 1) (+ nearest 2x upsample, conv)] per width,
                widths reversed -> GroupNorm, SiLU, conv_out

Every GroupNorm has epsilon 1e-6. The downsample pads one zero row at the bottom and one zero
column at the right, then runs a 3x3 stride-2 VALID convolution (diffusers' `padding=0` path), so
an (H, W) map becomes (H/2, W/2). Submodule names mirror diffusers' state-dict keys
(`down_blocks_0/resnets_1/conv1` <-> `down_blocks.0.resnets.1.conv1`), which keeps the weight
mapping in `weights.py` explicit and readable.

    model = AutoencoderKL(SD_KL_F8)
    mean, logvar = model.apply(variables, images, method=AutoencoderKL.encode)  # (B, H/8, W/8, 4)
    images = model.apply(variables, latents, method=AutoencoderKL.decode)       # (B, H, W, 3)

Images are in [-1, 1]; latents are unscaled (multiply by `scaling_factor`, 0.18215 for SD, before
diffusion, and divide before decoding).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PrecisionLike = Any

# The log-variance clamp of diffusers' DiagonalGaussianDistribution.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Shape of an AutoencoderKL (the fields of diffusers' config.json that change the graph).

    The spatial downsampling factor is 2 ** (len(block_out_channels) - 1): 8 for SD's four widths.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215

    def __post_init__(self):
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be multiples of "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm); {bad} are not."
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# Stable Diffusion's KL-f8 autoencoder (sd-vae-ft-ema / sd-vae-ft-mse): 83.7M parameters.
SD_KL_F8 = VAEConfig()


def _conv(features: int, kernel: int, name: str, dtype, precision, stride: int = 1, padding=None):
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        precision=precision,
        name=name,
    )


def _group_norm(groups: int, name: str, dtype) -> nn.GroupNorm:
    # Two-pass variance: the fast E[x^2] - E[x]^2 form loses digits on large activations.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=NORM_EPSILON,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus a shortcut (1x1 conv if widths differ). x: (B,H,W,C)."""

    features: int
    groups: int
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
        h = _conv(self.features, 3, "conv1", self.dtype, self.precision)(h)
        h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
        h = _conv(self.features, 3, "conv2", self.dtype, self.precision)(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, "conv_shortcut", self.dtype, self.precision)(x)
        return x + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual. x: (B, H, W, C).

    Scores are scaled by 1/sqrt(C) and the softmax runs in at least float32 (as diffusers'
    `upcast_softmax`).
    """

    groups: int
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(batch, -1, channels)

        def dense(name):
            return nn.Dense(channels, dtype=self.dtype, precision=self.precision, name=name)(h)

        q, k, v = dense("to_q"), dense("to_k"), dense("to_v")
        scores = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision) / math.sqrt(channels)
        weights = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)))
        out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v, precision=self.precision)
        out = nn.Dense(channels, dtype=self.dtype, precision=self.precision, name="to_out_0")(out)
        return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    """ResnetBlock, optional SelfAttention, ResnetBlock at the lowest resolution."""

    groups: int
    add_attention: bool = True
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        x = ResnetBlock(features, self.groups, self.dtype, self.precision, name="resnets_0")(x)
        if self.add_attention:
            x = SelfAttention(self.groups, self.dtype, self.precision, name="attentions_0")(x)
        return ResnetBlock(features, self.groups, self.dtype, self.precision, name="resnets_1")(x)


class Downsample(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, C): zero-pad bottom/right by one, 3x3 stride-2 VALID conv."""

    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, self.precision, 2, "VALID")(x)


class Upsample(nn.Module):
    """(B, H, W, C) -> (B, 2H, 2W, C): nearest-neighbour repeat, then a 3x3 conv."""

    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype, self.precision)(x)


class EncoderBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: `num_layers` ResnetBlocks, then an optional Downsample."""

    features: int
    num_layers: int
    groups: int
    downsample: bool
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(
                self.features, self.groups, self.dtype, self.precision, name=f"resnets_{j}"
            )(x)
        if self.downsample:
            x = Downsample(self.dtype, self.precision, name="downsamplers_0")(x)
        return x


class DecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: `num_layers` ResnetBlocks, then an optional Upsample."""

    features: int
    num_layers: int
    groups: int
    upsample: bool
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(
                self.features, self.groups, self.dtype, self.precision, name=f"resnets_{j}"
            )(x)
        if self.upsample:
            x = Upsample(self.dtype, self.precision, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """(B, H, W, in_channels) in [-1, 1] -> (B, H/f, W/f, 2 * latent_channels) moments."""

    config: VAEConfig
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        widths = c.block_out_channels
        x = _conv(widths[0], 3, "conv_in", self.dtype, self.precision)(x)
        for i, width in enumerate(widths):
            x = EncoderBlock(
                width,
                c.layers_per_block,
                c.norm_num_groups,
                downsample=i < len(widths) - 1,
                dtype=self.dtype,
                precision=self.precision,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(
            c.norm_num_groups,
            c.mid_block_add_attention,
            self.dtype,
            self.precision,
            name="mid_block",
        )(x)
        x = nn.silu(_group_norm(c.norm_num_groups, "conv_norm_out", self.dtype)(x))
        return _conv(2 * c.latent_channels, 3, "conv_out", self.dtype, self.precision)(x)


class Decoder(nn.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels), roughly in [-1, 1]."""

    config: VAEConfig
    dtype: Dtype = None
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        widths = c.block_out_channels[::-1]
        x = _conv(widths[0], 3, "conv_in", self.dtype, self.precision)(z)
        x = MidBlock(
            c.norm_num_groups,
            c.mid_block_add_attention,
            self.dtype,
            self.precision,
            name="mid_block",
        )(x)
        for i, width in enumerate(widths):
            x = DecoderBlock(
                width,
                c.layers_per_block + 1,
                c.norm_num_groups,
                upsample=i < len(widths) - 1,
                dtype=self.dtype,
                precision=self.precision,
                name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(_group_norm(c.norm_num_groups, "conv_norm_out", self.dtype)(x))
        return _conv(c.out_channels, 3, "conv_out", self.dtype, self.precision)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. `encode` -> (mean, logvar); `decode` latents -> images.

    Attributes:
      config: the architecture (`SD_KL_F8` for Stable Diffusion's VAE).
      dtype: compute dtype; None follows the inputs and parameters (float32 or float64).
      precision: matmul / conv precision (e.g. "highest" for float32 on TPU and GPU).
    """

    config: VAEConfig = SD_KL_F8
    dtype: Dtype = None
    precision: PrecisionLike = None

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype, self.precision)
        self.decoder = Decoder(c, self.dtype, self.precision)
        if c.use_quant_conv:
            self.quant_conv = _conv(2 * c.latent_channels, 1, None, self.dtype, self.precision)
        if c.use_post_quant_conv:
            self.post_quant_conv = _conv(c.latent_channels, 1, None, self.dtype, self.precision)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: (B, H, W, in_channels) in [-1, 1]; H, W multiples of the downsample factor.

        Returns (mean, logvar), each (B, H/f, W/f, latent_channels), logvar clamped to [-30, 20].
        """
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents: (B, h, w, latent_channels), unscaled. Returns (B, h*f, w*f, out_channels)."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (also what `init` traces)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from N(mean, exp(logvar)); mean, logvar: (B, h, w, c)."""
    noise = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


def init_params(config: VAEConfig, rng: jax.Array, image_size: int = 32) -> dict:
    """Random parameters (Flax default initialisers), e.g. for tests and timing."""
    images = jnp.zeros((1, image_size, image_size, config.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(config).init)(rng, images)["params"]


def param_shapes(config: VAEConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating weights."""
    factor = config.downsample_factor
    images = jax.ShapeDtypeStruct((1, factor, factor, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)["params"]
