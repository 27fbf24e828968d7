"""DiT (Peebles & Xie, arXiv 2212.09748), the attention baseline, matching the reference code.

Notation: x (B, H, W, C) NHWC latent with H = W = input_size, p the patch size, G = H / p the token
grid side, T = G * G tokens, D the width, C_out = 2C with learned sigma, else C.

    tokens = Linear(patchify(x)) + pos_embed              # (B, T, D); fixed 2D sin-cos positions
    c      = TimestepEmbedder(t) + LabelEmbedder(y)       # (B, D)
    repeat depth times (adaLN-Zero block):
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear_{D->6D}(SiLU(c))
        tokens += gate1 * Attention(modulate(LN(tokens), shift1, scale1))
        tokens += gate2 * MLP(modulate(LN(tokens), shift2, scale2))
    out = unpatchify(FinalLayer(tokens, c))               # (B, H, W, C_out)

Module names follow the reference (x_embedder, blocks, attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation, final_layer) so that a checkpoint converter is a rename plus transposes. One
layout difference: patches are flattened as (row, column, channel), whereas the reference conv
kernel is (D, C, p, p); converting it needs a transpose to (p, p, C, D) and a reshape.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffussm_jax.models.attention import self_attention
from diffussm_jax.models.layers import (
    LAYERS_AXIS,
    AdaLNModulation,
    Conditioning,
    Dense,
    Dtype,
    FinalLayer,
    constrain_batch,
    gelu_tanh,
    layer_norm,
    modulate,
    remat_block,
    remat_policy,
    sincos_pos_embed_2d,
)

_DIT_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}

# Paper names ("DiT-XL/2") -> DiT constructor arguments (everything except the data shape).
DIT_VARIANTS: dict[str, dict] = {
    f"DiT-{size}/{patch_size}": dict(dims, patch_size=patch_size)
    for size, dims in _DIT_SIZES.items()
    for patch_size in (2, 4, 8)
}


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """x (B, H, W, C) -> (B, T, p*p*C): tokens in raster order, patches flattened (row, col, C)."""
    batch, height, width, channels = x.shape
    p = patch_size
    x = x.reshape(batch, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, G_h, G_w, p, p, C)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(x: jax.Array, patch_size: int, grid_size: int) -> jax.Array:
    """Inverse of `patchify` for a square grid: x (B, T, p*p*C) -> (B, G*p, G*p, C)."""
    batch, _, features = x.shape
    p = patch_size
    channels = features // (p * p)
    x = x.reshape(batch, grid_size, grid_size, p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, G, p, G, p, C)
    return x.reshape(batch, grid_size * p, grid_size * p, channels)


class Attention(nn.Module):
    """Multi-head self attention with biased qkv and output projections (timm's Attention)."""

    hidden_size: int
    num_heads: int
    implementation: str = "auto"  # see models.attention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        batch, length, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # One D -> 3D matrix (not three D -> D ones) so xavier's fan_out is 3D as in the reference;
        # its outputs are laid out (q/k/v, head, head_dim) like timm's, so reference weights fit.
        qkv = Dense(3 * self.hidden_size, axes=("embed", "hidden"), name="qkv", **kw)(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        out = self_attention(qkv, self.implementation).reshape(batch, length, self.hidden_size)
        return Dense(self.hidden_size, axes=("hidden", "embed"), name="proj", **kw)(out)


class Mlp(nn.Module):
    """Linear D -> mlp_dim, GELU (tanh approximation, as DiT), Linear mlp_dim -> D."""

    hidden_size: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.mlp_dim, axes=("embed", "hidden"), name="fc1", **kw)(x)
        x = gelu_tanh(x)
        return Dense(self.hidden_size, axes=("hidden", "embed"), name="fc2", **kw)(x)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning; the identity map at initialisation."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    attention: str = "auto"  # see models.attention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, None]:
        """x: (B, T, D) residual stream, c: (B, D) -> ((B, T, D) in x's dtype, None).

        Returns a (carry, output) pair because that is the signature `nn.scan` needs.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain_batch(x)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(
            6, self.hidden_size, name="adaLN_modulation", **kw
        )(c)
        attention = Attention(self.hidden_size, self.num_heads, self.attention, name="attn", **kw)
        h = attention(modulate(layer_norm(x), shift_msa, scale_msa))
        # The sums keep the residual stream's dtype (float32 by default, so that bf16 rounding
        # does not accumulate over depth; see models.precision).
        x = (x + gate_msa[:, None, :] * h).astype(x.dtype)
        h = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), name="mlp", **kw)(
            modulate(layer_norm(x), shift_mlp, scale_mlp)
        )
        x = (x + gate_mlp[:, None, :] * h).astype(x.dtype)
        return constrain_batch(x), None


class DiT(nn.Module):
    """Diffusion Transformer on a square NHWC latent.

    Matmuls run in `dtype`, parameters are stored in `param_dtype`, the residual stream is kept
    in `residual_dtype` (models.precision sets the three); the prediction is float32. With
    `scan_layers` the blocks' parameters are stacked along a leading "layers" axis (compiles one
    block instead of depth); `remat` recomputes each block's activations in the backward pass
    instead of storing them.
    """

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    label_init_std: float = 0.02  # DiT's; 1.0 learns the class far sooner (docs/quickstart.md)
    timestep_init_std: float = 0.02
    timestep_scale: float = 1.0  # 1000 for flow's t in [0, 1]; see layers.Conditioning
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    residual_dtype: Dtype = jnp.float32
    attention: str = "auto"  # models.attention: "auto", "custom_vjp", "xla" or "cudnn"
    remat: bool | str = False  # see layers.REMAT_POLICIES
    scan_layers: bool = True

    def __post_init__(self) -> None:
        # Fail at construction, where the config is, rather than deep inside a traced reshape.
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                f"choose a patch_size that divides {self.input_size} (DiT uses 2, 4 or 8) or "
                "change the latent size."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "each head needs hidden_size / num_heads channels."
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by 4 for the 2D sin-cos "
                "positional embedding (sin and cos for each of the two axes)."
            )
        super().__post_init__()

    @property
    def out_channels(self) -> int:
        """C_out: noise prediction, plus the variance interpolation channels with learned sigma."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; expected (B, {', '.join(map(str, expected))}) "
                "(NHWC, H = W = input_size, C = in_channels)."
            )
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(
                f"t has shape {t.shape}; expected ({batch},), one timestep per example."
            )
        if y is not None and self.num_classes > 0 and y.shape != (batch,):
            raise ValueError(f"y has shape {y.shape}; expected ({batch},), one label per example.")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> jax.Array:
        """x: (B, H, W, C), t: (B,) float or int timesteps, y: (B,) int or None -> (B, H, W, C_out).

        y = None (or num_classes = 0) means unconditional: the null label is used. Training drops
        labels to it with probability class_dropout_prob before the call (`layers.drop_labels`).
        """
        self._check_inputs(x, t, y)
        grid_size = self.input_size // self.patch_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # A Dense on flattened patches is the reference's conv with kernel = stride = p.
        tokens = Dense(self.hidden_size, axes=("patch", "embed"), name="x_embedder", **kw)(
            patchify(x.astype(self.dtype), self.patch_size)
        )
        # A constant, not a parameter: the reference freezes it too (requires_grad=False).
        pos_embed = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, grid_size))
        tokens = tokens.astype(self.residual_dtype) + pos_embed[None].astype(self.residual_dtype)

        c = Conditioning(
            self.num_classes,
            self.hidden_size,
            label_init_std=self.label_init_std,
            timestep_init_std=self.timestep_init_std,
            timestep_scale=self.timestep_scale,
            name="conditioning",
            **kw,
        )(t, y)  # (B, D)

        policy = remat_policy(self.remat)
        if policy == "ssm_only":
            raise ValueError("remat='ssm_only' needs an SSM; DiT takes none, full or save_matmuls.")
        block = remat_block(DiTBlock, policy, self.scan_layers)
        block_kw = dict(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            attention=self.attention,
            **kw,
        )
        if self.scan_layers:
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
            )
            tokens, _ = blocks(name="blocks", **block_kw)(tokens, c)
        else:
            for i in range(self.depth):
                tokens, _ = block(name=f"blocks_{i}", **block_kw)(tokens, c)

        out = FinalLayer(
            self.hidden_size,
            self.patch_size * self.patch_size * self.out_channels,
            name="final_layer",
            **kw,
        )(tokens, c)  # (B, T, p*p*C_out)
        return unpatchify(out, self.patch_size, grid_size).astype(jnp.float32)
