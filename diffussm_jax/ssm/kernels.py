"""S4D initialisation and kernel generation: A's modes, the step size's initialiser, ZOH
discretisation, and the convolution kernel K[h, l] = 2 Re sum_n C dB dA^l, either from the full
Vandermonde tensor (the reference) or factored so that the (H, N/2, L) tensor never exists."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax.ssm.settings import INITS, InitName

# s4d_kernel's power factors are (channels, N/2, ~sqrt(L)) complex64; channels are generated in
# groups small enough that a factor holds at most this many elements (8 MiB).
KERNEL_CHUNK_ELEMENTS = 1 << 20


def hippo_legs_normal_eigenvalues(state_size: int) -> np.ndarray:
    """Eigenvalues of the normal part of the HiPPO-LegS matrix, N/2 with positive imaginary part.

    HiPPO-LegS is A[n,k] = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k). Adding
    P P^T with P[n] = sqrt(n + 1/2) leaves -1/2 I plus a skew-symmetric matrix (the "normal
    part" that S4D-LegS diagonalises). Returns (N/2,) complex128 sorted by imaginary part.
    """
    n = np.arange(state_size, dtype=np.float64)
    p = np.sqrt(n + 0.5)
    q = np.sqrt(2 * n + 1)
    hippo = -np.tril(np.outer(q, q), -1) - np.diag(n + 1)
    normal = hippo + np.outer(p, p)
    eig = np.linalg.eigvals(normal)
    eig = eig[eig.imag > 0]
    return eig[np.argsort(eig.imag)]


def s4d_eigenvalues(state_size: int, init: InitName = "lin") -> np.ndarray:
    """The N/2 complex modes of A (the other half are their conjugates). Returns (N/2,) complex128.

    lin:  -1/2 + i pi n
    inv:  -1/2 + i (N/pi) (N/(2n+1) - 1)
    legs: eigenvalues of the normal part of HiPPO-LegS (real part -1/2)
    """
    if state_size < 2 or state_size % 2:
        raise ValueError(
            f"state_size must be an even number >= 2 (N/2 complex conjugate pairs), got "
            f"{state_size}; use e.g. state_size=64."
        )
    half = state_size // 2
    n = np.arange(half, dtype=np.float64)
    if init == "lin":
        imag = np.pi * n
    elif init == "inv":
        imag = (state_size / np.pi) * (state_size / (2 * n + 1) - 1)
    elif init == "legs":
        return hippo_legs_normal_eigenvalues(state_size)
    else:
        raise ValueError(f"unknown S4D init {init!r}; choose one of {INITS}.")
    return -0.5 + 1j * imag


def log_dt_init(dt_min: float, dt_max: float) -> nn.initializers.Initializer:
    """log(dt) uniform in [log dt_min, log dt_max]."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}.")

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(
            key, shape, dtype, minval=math.log(dt_min), maxval=math.log(dt_max)
        )

    return init


# ----------------------------------------------------------------------------- kernel math


def discretize_zoh(dt: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero-order hold. dt (H,), a (H, N/2) complex -> dA = exp(dt A), dB = (exp(dt A) - 1) / A."""
    dta = dt[:, None] * a
    da = jnp.exp(dta)
    return da, (da - 1) / a


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _powers(log_da: jax.Array, count: int, stride: int = 1) -> jax.Array:
    """dA^(stride k) = exp(stride k dt A) for k < count: (H, N/2) -> (H, N/2, count) complex.

    Computed as products of the squarings dA^(stride 2^b) over the bits b of k: one complex
    exponential per (h, n) and at most log2(count) complex products per element, against an
    exponential (exp, cos, sin) per element, which made the kernel generation of DiffuSSM-S
    3x slower on XLA:CPU (scripts/kernel_bench.py). The rounding error grows with the number of
    bits, not with k. The derivative is that of the exponential, d/d log_da = stride k dA^(stride
    k), as a JVP, so the backward pass is one elementwise product too; differentiating the
    products would walk the chain of squarings back.
    """
    base = jnp.exp(log_da * stride)
    k = np.arange(count)
    out = jnp.where(k % 2 == 1, base[..., None], 1)
    for bit in range(1, (count - 1).bit_length()):
        base = base * base
        out = out * jnp.where((k >> bit) % 2 == 1, base[..., None], 1)
    return out


@_powers.defjvp
def _powers_jvp(count, stride, primals, tangents):
    (log_da,), (d_log_da,) = primals, tangents
    out = _powers(log_da, count, stride)
    exponents = (stride * np.arange(count)).astype(np.dtype(log_da.real.dtype))
    return out, out * (d_log_da[..., None] * exponents)


def _real_and_imag(x: jax.Array, axis: int) -> jax.Array:
    """Complex (..., K, ...) -> real (..., 2K, ...): [Re x, Im x] stacked along `axis`.

    Products of complex numbers whose real part is wanted become one real matmul over the
    doubled axis: Re(sum p q) = sum [Re p, -Im p] . [Re q, Im q].
    """
    return jnp.concatenate([x.real, x.imag], axis=axis)


def _lower_toeplitz(taps: jax.Array) -> jax.Array:
    """(H, T) -> (H, T, T) with [h, t, r] = taps[h, t - r] for t >= r, else 0.

    Without a gather (whose gradient is a scatter): w = [K0, 0 x T, K_{T-1}, ..., K_1] tiled T
    times and read as rows of 2T - 1 shifts each row by one, so entry (t, r) is w[(r - t) mod 2T].
    """
    channels, size = taps.shape
    w = jnp.concatenate(
        [taps[:, :1], jnp.zeros((channels, size), taps.dtype), taps[:, :0:-1]], axis=1
    )
    rows = jnp.tile(w, (1, size))[:, : size * (2 * size - 1)]
    return rows.reshape(channels, size, 2 * size - 1)[:, :, :size]


def vandermonde_kernel(log_dt: jax.Array, a: jax.Array, c: jax.Array, length: int) -> jax.Array:
    """K[h, l] = 2 Re sum_n C dB dA^l, l < length, from the full (H, N/2, L) Vandermonde tensor.

    (H,), (H, N/2), (H, N/2) -> (H, L). Memory O(H N L): the naive reference that `s4d_kernel`
    avoids (1.2 GB at H=1152, N=64, L=4096); used directly only for short lengths.
    """
    dt = jnp.exp(log_dt)
    _, db = discretize_zoh(dt, a)
    powers = jnp.exp(dt[:, None, None] * a[:, :, None] * jnp.arange(length))  # (H, N/2, L)
    return 2 * jnp.einsum("hn,hnl->hl", c * db, powers).real


def _group_size(channels: int, elements_per_channel: int, max_elements: int) -> int:
    """Largest divisor g of `channels` with g * elements_per_channel <= max_elements, else 1."""
    fitting = (
        g
        for g in range(channels, 0, -1)
        if channels % g == 0 and g * elements_per_channel <= max_elements
    )
    return next(fitting, 1)


def _over_channel_groups(fn, group: int, *args: jax.Array) -> jax.Array:
    """fn on `group` channels at a time, one group after another, each group rematerialised.

    args have the channels leading, (H, ...); so does the result. With `jax.checkpoint` the
    backward pass recomputes one group's intermediates at a time instead of storing them all,
    so memory is bounded by the group, not by H.
    """
    channels = args[0].shape[0]
    if group >= channels:
        return fn(*args)
    grouped = [x.reshape(channels // group, group, *x.shape[1:]) for x in args]
    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), grouped)
    return out.reshape(channels, *out.shape[2:])


def s4d_kernel(
    log_dt: jax.Array,
    a: jax.Array,
    c: jax.Array,
    length: int,
    *,
    chunk_elements: int = KERNEL_CHUNK_ELEMENTS,
) -> jax.Array:
    """Convolution kernel of a diagonal SSM (ZOH, B = 1 absorbed in C).

    Args:
      log_dt: (H,) real.
      a: (H, N/2) complex, Re < 0.
      c: (H, N/2) complex.
      length: L, any positive int.
      chunk_elements: bound on the elements of the larger power factor, G * N/2 * ~sqrt(L),
        for a group of G channels; groups are generated one after another.

    Returns:
      (H, L) float32 (float64 if the inputs are).

    With l = j * block + t the powers factor as dA^l = dA^t dA^(j block), so

        K[h, j block + t] = 2 Re sum_n (C dB dA^t)[h, n, t] (dA^(j block))[h, n, j],

    a (block, N) x (N, L / block) real matmul per channel. With block ~ sqrt(L) the factors are
    (H, N/2, ~sqrt(L)): the (H, N/2, L) tensor exists in neither the forward nor the backward
    pass, and there are H N sqrt(L) complex exponentials instead of H N L / 2.
    """
    channels, half = a.shape
    block = min(length, 1 << math.ceil(math.log2(math.sqrt(length))))
    num_blocks = -(-length // block)

    def factored(log_dt, a, c):  # (G,), (G, N/2), (G, N/2) -> (G, L)
        dt = jnp.exp(log_dt)
        _, db = discretize_zoh(dt, a)
        log_da = dt[:, None] * a
        inner = (c * db)[:, :, None] * _powers(log_da, block)  # (G, N/2, block)
        outer = _powers(log_da, num_blocks, block)  # (G, N/2, num_blocks)
        inner = 2 * jnp.concatenate([inner.real, -inner.imag], axis=1)  # (G, N, block)
        kernel = jnp.einsum("gkt,gkj->gjt", inner, _real_and_imag(outer, axis=1))
        return kernel.reshape(log_dt.shape[0], num_blocks * block)[:, :length]

    group = _group_size(channels, half * max(block, num_blocks), chunk_elements)
    return _over_channel_groups(factored, group, log_dt, a, c)
