"""A small convolutional UNet: a reference point outside DiffuSSM and DiT (not package API).

`scripts/digits_sweep.py` trains it with the library's own train step, diffusion and samplers,
so a variant that fails on both backbones but learns with this network points at the backbones,
and one that fails here too points at the shared pipeline. Its conditioning is the usual one of
convolutional diffusion models (ADM, the DDPM tutorials): the timestep and label embedding is
added to every residual block as a per-channel bias, with no adaLN gates.

The module follows the interface the training code expects of a model: fields `input_size`,
`in_channels`, `num_classes`, `learn_sigma`, `class_dropout_prob`, and
`__call__(x (B, H, W, C), t (B,), y (B,) | None, train)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffussm_jax.models import layers


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, + Dense(SiLU(c)) bias, GroupNorm, SiLU, 3x3 conv, residual."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(x)))
        h = h + nn.Dense(self.features)(nn.silu(c))[:, None, None, :]
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(h)))
        skip = x if x.shape[-1] == self.features else nn.Dense(self.features)(x)
        return skip + h


class ReferenceUNet(nn.Module):
    """Two downsamplings by 2 (16 -> 8 -> 4 for 16x16 digits), skip connections, widths w, 2w.

    x (B, H, W, C), t (B,), y (B,) or None -> (B, H, W, C_out); about 0.46M parameters at
    width 32. The conditioning is the library's `Conditioning` (so its init is the one under
    test), at width 4w.
    """

    input_size: int
    in_channels: int
    num_classes: int
    learn_sigma: bool = False
    class_dropout_prob: float = 0.1
    width: int = 32
    label_init_std: float = 0.02
    timestep_init_std: float = 0.02

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        w = self.width
        c = layers.Conditioning(
            self.num_classes,
            4 * w,
            label_init_std=self.label_init_std,
            timestep_init_std=self.timestep_init_std,
        )(t, y)
        full = ResBlock(w)(nn.Conv(w, (3, 3))(x), c)
        half = ResBlock(2 * w)(nn.avg_pool(full, (2, 2), (2, 2)), c)
        h = nn.avg_pool(half, (2, 2), (2, 2))
        h = ResBlock(2 * w)(ResBlock(2 * w)(h, c), c)
        h = jax.image.resize(h, (*half.shape[:3], h.shape[-1]), "nearest")
        h = ResBlock(2 * w)(jnp.concatenate([h, half], axis=-1), c)
        h = jax.image.resize(h, (*full.shape[:3], h.shape[-1]), "nearest")
        h = ResBlock(w)(jnp.concatenate([h, full], axis=-1), c)
        h = nn.silu(nn.GroupNorm(num_groups=8)(h))
        return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
