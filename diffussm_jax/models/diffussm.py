"""DiffuSSM: the attention-free, patchify-free diffusion backbone (Yan, Gu & Rush, 2023).

Shapes for one example (spec section 2): D width, L = H*W latent pixels, M hourglass ratio,
J = L / M. The residual stream lives at the short length J; each block expands to the full
length L, runs the bidirectional SSM there, and contracts back:

    I~ = adaLN(I)                         (J, D)
    U  = act(act(I~ W0) Wup)              (J, D) -> (J, M, D) -> (L, D)
    Y  = BiSSM(U)                         (L, 2D)
    I' = act(Wdown_k Y[j, k])             (J, M, 2D) -> (J, M, 2D/M) -> (J, 2D)
    O  = (act(I' W2) * act(I~ W1)) W3     (J, D)
    I  = I + gate * O

Token l of the full sequence is sub-position k = l mod M of short token j = l // M.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffussm_jax import ssm
from diffussm_jax.models import layers
from diffussm_jax.models.layers import Dense, partitioned

# Positional information added to the short tokens. The spec adds none, as the paper says the
# SSM is position-aware; but a 1-D raster SSM locates a pixel's column only through kernels
# periodic in the image width, and docs/quickstart.md measures what that costs a small model.
POS_EMBEDS = ("none", "sincos", "learned")


class SubpositionDense(nn.Module):
    """M independent Linear maps, one per sub-position k of a short token (the hourglass).

    The layouts make each a plain matmul, with no transpose or copy around it (a test counts
    them in the optimised HLO):

    shared_input=True (Wup)    x (..., in) -> (..., M, out), kernel (in, M, out): one matmul
                               whose output rows are the M sub-positions' tokens in order;
    shared_input=False (Wdown) x (M, ..., in) -> (M, ..., out), kernel (M, in, out): a batched
                               matmul over the leading sub-position axis.

    Xavier-uniform per map (fan_in = in, fan_out = out), zero bias.
    """

    groups: int
    features: int
    shared_input: bool = False
    axes: tuple[str | None, str | None] = ("hidden", "hidden_out")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m, n_in, n_out = self.groups, x.shape[-1], self.features
        if self.shared_input:  # (in, M, out)
            shape, axes, in_axis, group_axis = (
                (n_in, m, n_out),
                (self.axes[0], None, self.axes[1]),
                0,
                1,
            )
        else:  # (M, in, out)
            shape, axes, in_axis, group_axis = (m, n_in, n_out), (None, *self.axes), 1, 0
        init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=2, batch_axis=(group_axis,))
        kernel = self.param("kernel", partitioned(init, axes), shape, self.param_dtype)
        bias = self.param(
            "bias", partitioned(layers.zeros, (None, self.axes[1])), (m, n_out), self.param_dtype
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.shared_input:
            return layers.dense_dot(x, kernel) + bias
        bias = bias.reshape(m, *(1,) * (x.ndim - 2), n_out)
        return jnp.einsum("m...i,mio->m...o", x, kernel) + bias


class DiffuSSMBlock(nn.Module):
    """One DiffuSSM layer. x (B, J, D), c (B, D) -> (B, J, D)."""

    hidden_size: int
    hourglass_ratio: int = 2
    ssm: ssm.SSMSettings = ssm.SSMSettings()
    activation: str = "gelu_tanh"
    remat_ssm: bool = False  # recompute the SSM in the backward pass (remat="ssm_only")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ssm_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        batch, short_len, width = x.shape
        ratio = self.hourglass_ratio
        act = layers.activation_fn(self.activation)
        x = layers.constrain_batch(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        shift, scale, gate = layers.AdaLNModulation(3, width, name="adaLN_modulation", **kw)(c)
        x_mod = layers.modulate(layers.layer_norm(x), shift, scale)

        h0 = act(Dense(width, axes=("embed", "hidden"), name="W0", **kw)(x_mod))
        # Wup: M maps D -> D of the same input; (B, J, M, D) is (B, L, D) in raster order.
        up = SubpositionDense(ratio, width, shared_input=True, name="Wup", **kw)
        u = act(up(h0)).reshape(batch, short_len * ratio, width)

        ssm_cls = ssm.BidirectionalSSM
        if self.remat_ssm:
            ssm_cls = nn.remat(ssm_cls)
        y = ssm_cls(
            width,
            self.ssm,
            channels_first=True,
            dtype=self.ssm_dtype,
            name="ssm",
        )(layers.constrain_batch(u))  # (B, 2D, L), the layout the SSM computes in

        # Wdown: M maps 2D -> 2D/M, one per sub-position, batched over a leading sub-position
        # axis. One transpose takes the SSM's output there (it would take one to (B, L, 2D)
        # anyway); the way back to (B, J, 2D) is on Wdown's output, half the size.
        y = y.reshape(batch, 2 * width, short_len, ratio).transpose(3, 0, 2, 1)  # (M, B, J, 2D)
        down = SubpositionDense(ratio, 2 * width // ratio, name="Wdown", **kw)
        x_short = act(down(y)).transpose(1, 2, 0, 3).reshape(batch, short_len, 2 * width)

        gate_branch = act(Dense(2 * width, axes=("embed", "hidden"), name="W1", **kw)(x_mod))
        value = act(Dense(2 * width, axes=("hidden", "hidden_out"), name="W2", **kw)(x_short))
        out = Dense(width, axes=("hidden", "embed"), name="W3", **kw)(value * gate_branch)
        # The sum keeps the residual stream's dtype (see models.precision).
        return layers.constrain_batch((x + gate[:, None, :] * out).astype(x.dtype))


class _ScannedBlock(DiffuSSMBlock):
    """Block with the (carry, output) signature `nn.scan` expects."""

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, None]:
        return DiffuSSMBlock.__call__(self, x, c), None


class DiffuSSM(nn.Module):
    """DiffuSSM denoiser. x (B, H, W, C) NHWC, t (B,), y (B,) int or None -> (B, H, W, C_out).

    C_out = 2C when sigma is learned (noise prediction + variance interpolation), else C.
    y == num_classes is the null label for classifier-free guidance; num_classes = 0 gives an
    unconditional model.
    """

    input_size: int
    in_channels: int
    hidden_size: int
    depth: int
    hourglass_ratio: int = 2
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    label_init_std: float = 0.02  # DiT's; 1.0 learns the class far sooner (docs/quickstart.md)
    timestep_init_std: float = 0.02
    timestep_scale: float = 1.0  # 1000 for flow's t in [0, 1]; see layers.Conditioning
    ssm: ssm.SSMSettings = ssm.SSMSettings()  # state size, init, dt range, backend
    activation: str = "gelu_tanh"
    pos_embed: str = "none"  # "none" (spec), "sincos" (fixed 2D, as DiT) or "learned"
    dtype: Any = jnp.float32  # compute; the dtypes are set together by models.precision
    param_dtype: Any = jnp.float32
    residual_dtype: Any = jnp.float32
    ssm_dtype: Any = jnp.float32
    remat: bool | str = False  # see layers.REMAT_POLICIES
    scan_layers: bool = True

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def _check_input(self, x: jax.Array) -> None:
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiffuSSM expects x of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(NHWC), got {tuple(x.shape)}; build the model with input_size and in_channels "
                "matching the data."
            )
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBEDS}.")
        if self.input_size % self.hourglass_ratio:
            raise ValueError(
                f"latent width {self.input_size} is not divisible by hourglass_ratio "
                f"{self.hourglass_ratio}: each short token groups {self.hourglass_ratio} "
                "horizontally adjacent pixels. Use an input size that is a multiple of the ratio "
                "or another hourglass_ratio."
            )

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        self._check_input(x)
        batch, height, width, channels = x.shape
        ratio, dim = self.hourglass_ratio, self.hidden_size
        short_len = height * width // ratio
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Raster order; M horizontally adjacent pixels form one short token.
        tokens = x.reshape(batch, short_len, ratio * channels).astype(self.dtype)
        h = Dense(dim, axes=("patch", "embed"), name="x_embedder", **kw)(tokens)
        h = h.astype(self.residual_dtype)
        if self.pos_embed == "learned":
            pos = self.param(
                "pos_embed",
                partitioned(layers.normal_002, (None, "embed")),
                (short_len, dim),
                self.param_dtype,
            )
            h = h + pos.astype(h.dtype)
        elif self.pos_embed == "sincos":
            # Short token j sits at row j // (W / M), column j % (W / M) of the latent.
            pos = layers.sincos_pos_embed_2d(dim, height, width // ratio)
            h = h + jnp.asarray(pos, h.dtype)
        c = layers.Conditioning(
            self.num_classes,
            dim,
            label_init_std=self.label_init_std,
            timestep_init_std=self.timestep_init_std,
            timestep_scale=self.timestep_scale,
            name="conditioning",
            **kw,
        )(t, y)

        block_kw = dict(
            hidden_size=dim,
            hourglass_ratio=ratio,
            ssm=self.ssm,
            activation=self.activation,
            ssm_dtype=self.ssm_dtype,
            **kw,
        )
        policy = layers.remat_policy(self.remat)
        block_kw["remat_ssm"] = policy == "ssm_only"
        if self.scan_layers:
            block_cls = layers.remat_block(_ScannedBlock, policy, scanned=True)
            blocks = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: layers.LAYERS_AXIS},
            )(name="blocks", **block_kw)
            h, _ = blocks(h, c)
        else:
            block_cls = layers.remat_block(DiffuSSMBlock, policy, scanned=False)
            for i in range(self.depth):
                h = block_cls(name=f"blocks_{i}", **block_kw)(h, c)

        out = layers.FinalLayer(dim, ratio * self.out_channels, name="final_layer", **kw)(h, c)
        # The diffusion loss and samplers work in float32 whatever the compute dtype.
        return out.reshape(batch, height, width, self.out_channels).astype(jnp.float32)
