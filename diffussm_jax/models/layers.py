"""Building blocks shared by DiffuSSM and DiT: conditioning embedders, adaLN, final layer.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that the
training code can map them to mesh axes with config rules. The logical names used are:

  "embed"    the model width D (the residual stream)
  "hidden"   any wider internal dimension (MLP hidden, adaLN outputs, 2D SSM width)
  "hidden_out"  the output side of a hidden -> hidden map (names must differ within a tensor)
  "vocab"    rows of the label table
  "freq"     the sinusoidal timestep-frequency dimension
  "patch"    the flattened patch / hourglass-group input or output channels
  "ssm"      per-channel SSM parameters (D channels) and "state" their N/2 modes
  "layers"   the stacked-layer axis added by `nn.scan`
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = jax.nn.initializers.Initializer

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
normal_002 = nn.initializers.normal(stddev=0.02)

LAYERS_AXIS = "layers"


def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Attach logical axis names to an initializer."""
    return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
    """`nn.Dense` with logical axis names on kernel (in_axis, out_axis) and bias (out_axis)."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "hidden")
    kernel_init: Initializer = xavier_uniform
    bias_init: Initializer = zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias", partitioned(self.bias_init, self.axes[1:]), (self.features,), self.param_dtype
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return dense_dot(x, kernel) + bias


def dense_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., in) . kernel (in, *out) -> (..., *out), computed as one 2-D matmul.

    Folding the leading axes into rows before the dot (a free reshape) gives XLA a plain
    (rows, in) x (in, out) matmul in both passes; a dot with extra free axes on x is lowered
    differently. On XLA:CPU it took the DiT-S/2 train step (batch 8, 32x32x4) from 2.36 to
    2.17 s; DiffuSSM-S's did not change (scripts/dense_ab.py, docs/benchmarks).
    """
    rows = x.reshape(-1, x.shape[-1])
    out = jnp.dot(rows, kernel.reshape(kernel.shape[0], -1))
    return out.reshape(*x.shape[:-1], *kernel.shape[1:])


# ----------------------------------------------------------------------------- lean gradients
# What a backward pass needs from an elementwise op is decided by JAX's autodiff, before XLA sees
# the program: for tanh-GELU it keeps five tensors of the activation's size (x, x^2, tanh, 1 - t^2
# and a product), for a float32 LayerNorm two float32 copies of its input. Without remat those
# are stored for every layer, and in DiffuSSM-XL at 512 px they were most of the 0.6 GiB an
# example costs per layer (docs/pod.md). The versions here give the same values with one saved
# tensor each, in the activation's dtype.


def _with_derivative(fn, derivative):
    """fn (elementwise) whose gradient keeps only derivative(x), computed in float32 (float64
    for float64 inputs) and stored in x's dtype."""

    @jax.custom_jvp
    def wrapped(x):
        return fn(x)

    @wrapped.defjvp
    def jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        slope = derivative(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
        return fn(x), dx * slope.astype(x.dtype)

    return wrapped


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _gelu_tanh_derivative(x: jax.Array) -> jax.Array:
    # d/dx 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2 / pi)
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)


def _gelu_derivative(x: jax.Array) -> jax.Array:
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    return 0.5 * (1 + jax.lax.erf(x / math.sqrt(2))) + x * jnp.exp(-0.5 * x * x) / math.sqrt(
        2 * math.pi
    )


def _silu_derivative(x: jax.Array) -> jax.Array:
    s = jax.nn.sigmoid(x)
    return s * (1 + x * (1 - s))


gelu_tanh = _with_derivative(lambda x: nn.gelu(x, approximate=True), _gelu_tanh_derivative)
gelu = _with_derivative(lambda x: nn.gelu(x, approximate=False), _gelu_derivative)
silu = _with_derivative(nn.silu, _silu_derivative)

ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": gelu, "silu": silu}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def _normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + 1e-6)
    return ((x32 - mean) * rstd).astype(x.dtype), rstd


@jax.custom_vjp
def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), computed in float32.

    The gradient keeps the output (in x's dtype; adaLN keeps it anyway) and 1/std per token:
    dx = (g - mean(g) - y mean(g y)) / std.
    """
    return _normalize(x)[0]


def _layer_norm_fwd(x):
    y, rstd = _normalize(x)
    return y, (y, rstd)


def _layer_norm_bwd(saved, g):
    y, rstd = saved
    y32, g32 = y.astype(rstd.dtype), g.astype(rstd.dtype)
    mean_g = g32.mean(-1, keepdims=True)
    mean_gy = (g32 * y32).mean(-1, keepdims=True)
    return (((g32 - mean_g - y32 * mean_gy) * rstd).astype(y.dtype),)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x (B, L, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def sincos_pos_embed_2d(embed_dim: int, rows: int, cols: int | None = None) -> np.ndarray:
    """Fixed 2D sin-cos positions of a rows x cols grid (cols = rows if unset), raster order.

    Returns (rows * cols, embed_dim) float32. Token k = row * cols + col gets
    [sin(col * w), cos(col * w), sin(row * w), cos(row * w)], each a quarter of embed_dim, with
    w_i = 10000 ** (-i / (embed_dim / 4)). On a square grid this is DiT's reference
    get_2d_sincos_pos_embed (whose first half, though called emb_h there, encodes the column).
    Computed in float64 as the reference does, then rounded once.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos positions need embed_dim divisible by 4, got {embed_dim}.")
    cols = rows if cols is None else cols
    quarter = embed_dim // 4
    omega = 1.0 / 10_000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # (D/4,)
    row, col = np.divmod(np.arange(rows * cols), cols)  # (T,) each

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos[:, None] * omega[None, :]  # (T, D/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(col), encode(row)], axis=1).astype(np.float32)


def timestep_frequencies(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal frequencies then Linear, SiLU, Linear.

    Kernels are normal(init_std): 0.02 is DiT's init.
    """

    hidden_size: int
    frequency_dim: int = 256
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        kernel_init = nn.initializers.normal(stddev=self.init_std)
        kw = dict(kernel_init=kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        h = timestep_frequencies(t, self.frequency_dim).astype(self.dtype)
        h = Dense(self.hidden_size, axes=("freq", "embed"), name="mlp_in", **kw)(h)
        h = silu(h)
        return Dense(self.hidden_size, axes=("hidden", "embed"), name="mlp_out", **kw)(h)


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_label: int) -> jax.Array:
    """Classifier-free guidance training: each label (B,) becomes `null_label` with probability
    `prob`, independently. The one place labels are dropped (the train step calls it once per
    global batch, so micro-batches see the same drops as one big batch)."""
    drop = jax.random.bernoulli(rng, prob, labels.shape)
    return jnp.where(drop, null_label, labels)


class LabelEmbedder(nn.Module):
    """y (B,) int -> (B, D). Row `num_classes` is the null label used by classifier-free guidance
    (`drop_labels` puts it in training).

    The table is normal(init_std): 0.02 is DiT's init; see `Conditioning` for why a small model
    trained briefly wants 1.0.
    """

    num_classes: int
    hidden_size: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            partitioned(nn.initializers.normal(stddev=self.init_std), ("vocab", "embed")),
            (self.num_classes + 1, self.hidden_size),
            self.param_dtype,
        )
        return jnp.take(table, y, axis=0).astype(self.dtype)


class Conditioning(nn.Module):
    """c = TimestepEmbedder(timestep_scale * t) + LabelEmbedder(y); unconditional: t only.

    `label_init_std` and `timestep_init_std` set the scale of c at initialisation. DiT's 0.02
    makes c small, and Adam grows a parameter by about one learning rate per step, so the class
    signal needs on the order of (unit scale) / lr steps before it can steer the output: nothing
    over a 400K-step ImageNet run, most of a 15-minute CPU run (docs/quickstart.md measures it).

    `timestep_scale` maps the process's time onto the embedding's range: 1 for the Gaussian
    process's integer steps 0..T-1, 1000 for flow times in [0, 1], so that both span the same
    sinusoid frequencies (periods 1 to 10000 steps) and the same init serves both.
    """

    num_classes: int
    hidden_size: int
    label_init_std: float = 0.02
    timestep_init_std: float = 0.02
    timestep_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, y: jax.Array | None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.timestep_scale != 1.0:  # static: the Gaussian path stays bit-identical
            t = t.astype(jnp.float32) * self.timestep_scale
        c = TimestepEmbedder(
            self.hidden_size, init_std=self.timestep_init_std, name="t_embedder", **kw
        )(t)
        if self.num_classes > 0:
            if y is None:
                y = jnp.full(t.shape, self.num_classes, jnp.int32)
            c = c + LabelEmbedder(
                self.num_classes,
                self.hidden_size,
                init_std=self.label_init_std,
                name="y_embedder",
                **kw,
            )(y)
        return c


class AdaLNModulation(nn.Module):
    """SiLU(c) -> Linear(D -> n*D), zero-initialised (adaLN-Zero); returns n chunks of (B, D)."""

    num_chunks: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: jax.Array) -> list[jax.Array]:
        out = Dense(
            self.num_chunks * self.hidden_size,
            axes=("embed", "hidden"),
            kernel_init=zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="linear",
        )(silu(c))
        return jnp.split(out, self.num_chunks, axis=-1)


class FinalLayer(nn.Module):
    """LayerNorm + adaLN (shift, scale) + zero-initialised Linear D -> out_features."""

    hidden_size: int
    out_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = AdaLNModulation(2, self.hidden_size, name="adaLN_modulation", **kw)(c)
        x = modulate(layer_norm(x), shift, scale)
        return Dense(
            self.out_features, axes=("embed", "patch"), kernel_init=zeros, name="linear", **kw
        )(x)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Marks x's leading axis as the logical "batch" axis (a sharding constraint when logical
    axis rules and a mesh are active, as in the train step; otherwise nothing)."""
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


# What the backward pass recomputes instead of storing (`remat` on the models):
#   none          store every activation the gradient needs (fastest, most memory);
#   full          store each block's input only, recompute the block;
#   save_matmuls  store the outputs of matmuls without batch dimensions (the dense layers),
#                 recompute the rest (norms, activations, the SSM's FFTs);
#   ssm_only      recompute only the SSM layer inside each block (DiffuSSM only).
REMAT_POLICIES = ("none", "full", "save_matmuls", "ssm_only")


def remat_policy(value: bool | str | None) -> str:
    """The remat policy named by a config value; True / False (also as text, as a command line
    gives them) are "full" / "none"."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat={value!r}; choose one of {REMAT_POLICIES} (or True / False).")
    return value


def remat_block(block_cls: type[nn.Module], policy: str, scanned: bool) -> type[nn.Module]:
    """`block_cls` rematerialised as `policy` says (unchanged for "none" and "ssm_only")."""
    if policy not in ("full", "save_matmuls"):
        return block_cls
    saved = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(
        block_cls,
        policy=saved if policy == "save_matmuls" else None,
        # Under scan, CSE across iterations cannot happen, so its prevention only costs speed.
        prevent_cse=not scanned,
    )
