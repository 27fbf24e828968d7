"""Diagonal state space layers (S4D), with three interchangeable ways to apply them.

The math is a set of pure functions of arrays, so it can be checked against float64 references:

  s4d_eigenvalues       A's N/2 complex modes for the Lin / Inv / LegS initialisations
  discretize_zoh        zero-order hold: (dt, A) -> (dA, dB)
  vandermonde_kernel    K[h, l] = 2 Re sum_n C[h,n] dB[h,n] dA[h,n]^l by explicit powers (H, N/2, L)
  s4d_kernel            the same K without the (H, N/2, L) tensor: powers factored into two short
                        Vandermondes, so the sum over modes is a small matmul per channel
  fft_causal_conv       y = irfft(rfft(u, n) * rfft(K, n))[:L], n >= 2L - 1 a fast FFT length
  scan_causal_ssm       the recurrence x_l = dA x_{l-1} + dB u_l as a parallel associative scan
  chunked_causal_ssm    chunks of T steps: a (T, T) Toeplitz matmul inside each chunk, the N/2
                        complex state carried between chunks by matmuls and a scan over L/T chunks
  causal_ssm            y = SSM(u) + D u with the backend `SSMSettings` picks (fft | scan | chunked)
  bidirectional_ssm     [causal SSM(u), anti-causal SSM'(u)]; the fft backend shares one rfft(u)
  direct_causal_conv    the O(L^2) sum, for tests
  s4d_recurrence        the SSM run as an RNN (sequential scan), for tests

All backends compute in float32/complex64 whatever the activation dtype (float64 inputs stay
float64, for tests); only the chunked backend's matmul operands follow bfloat16 activations, with
float32 accumulation. Costs per (example, position, channel): fft ~ a few log2(2L) flops in FFTs;
scan ~ 6 N real flops, memory-bound over a (B, L, H, N/2) complex tensor; chunked T + 2N MACs, all
in dense matmuls.

`S4D` and `BidirectionalSSM` are thin Linen layers that own the parameters. The kernel
depends only on the parameters, so it is generated once per call, not per example.

`SSMSettings` holds what configures an SSM (state size, initialisation, step-size range, backend,
chunk length); the models take it as one field and hand it down unchanged to the layers and to
`causal_ssm` / `bidirectional_ssm`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

InitName = Literal["lin", "inv", "legs"]
INITS = ("lin", "inv", "legs")
Backend = Literal["fft", "scan", "chunked"]
BACKENDS = ("fft", "scan", "chunked")

# s4d_kernel's power factors are (channels, N/2, ~sqrt(L)) complex64; channels are generated in
# groups small enough that a factor holds at most this many elements (8 MiB).
KERNEL_CHUNK_ELEMENTS = 1 << 20
# The scan backend runs channel groups one after another so that its (B, L, group, N/2)
# complex64 state holds at most this many elements (64 MiB per array of the scan).
SCAN_STATE_ELEMENTS = 1 << 23
# Chunk length T of the chunked backend: T MACs per element go to the Toeplitz matmul and 2N to
# the state, and L/T chunks to the sequential part; 64 was fastest from L = 8192 on, within noise
# of 32 below (docs/benchmarks/README.md, ssm.md).
DEFAULT_CHUNK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class SSMSettings:
    """How an S4D layer is initialised and applied (spec section 3).

    state_size: N, the state per channel (N/2 complex conjugate pairs); even, >= 2.
    init: A's initial modes, "lin" (S4D-Lin), "inv" (S4D-Inv) or "legs" (S4D-LegS).
    dt_min, dt_max: the range of the step size's log-uniform initialisation (BiGS: 0.01, 1).
    backend: "fft" (kernel + FFT convolution), "scan" (associative scan of the recurrence) or
      "chunked" (chunk_size-step Toeplitz and state matmuls); same parameters, same function.
    chunk_size: T of the chunked backend.

    Frozen (hashable), so Linen modules take it as a field.
    """

    state_size: int = 64
    init: InitName = "lin"
    dt_min: float = 0.001
    dt_max: float = 0.1
    backend: Backend = "fft"
    chunk_size: int = DEFAULT_CHUNK_SIZE


# An SSM's parameters as the pure functions take them: log_dt (H,), a (H, N/2) complex,
# c (H, N/2) complex, d (H,).
SSMParams = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


# ----------------------------------------------------------------------------- initialisation


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


# ----------------------------------------------------------------------------- backends


# FFT lengths are chosen among odd * 2^k for these odd parts (2^a 3^b 5^c, b <= 2, c <= 1).
FFT_ODD_FACTORS = (1, 3, 5, 9, 15, 45)


def fft_size(min_length: int) -> int:
    """Smallest n >= min_length of the form odd * 2^k with odd in FFT_ODD_FACTORS.

    FFT time depends on the length's prime factors. On XLA:CPU (ducc) 2047 = 23 * 89 takes
    1.9x as long as 2048 and 2025 = 3^4 5^2 1.2x, while 2304 = 9 * 2^8, 2560 = 5 * 2^9,
    4608 = 9 * 2^9 and 18432 = 9 * 2^11 cost no more per point than powers of two
    (NOTES.md). Allowing them keeps the padding of 2L - 1 well under 2x: e.g. 4608 instead
    of 8192 for a 48 x 48 latent.
    """
    target = max(1, min_length)
    sizes = []
    for odd in FFT_ODD_FACTORS:
        size = odd
        while size < target:
            size *= 2
        sizes.append(size)
    return min(sizes)


def fft_causal_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """Causal convolution y[l] = sum_{j<=l} K[j] u[l-j] along axis 1 via FFT.

    Args:
      u: (B, L, H), computed in float32 (float64 inputs stay float64).
      kernel: (H, L).

    Returns:
      (B, L, H) in the promoted float dtype. Zero padding to n >= 2L - 1 keeps it causal: the
      circular convolution of length n has no wrap-around for sequences of length L.

    XLA's FFT transforms the last axis, so the time axis is moved there once and back once
    (jnp.fft on axis 1 would transpose around each of the three transforms).
    """
    length = u.shape[1]
    n_fft = fft_size(2 * length - 1)
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    u_f = batched_fft("rfft", jnp.swapaxes(u.astype(dtype), 1, 2), n_fft)  # (B, H, F)
    k_f = _rows_fft(jnp.fft.rfft, kernel.astype(dtype), n_fft)  # (H, F)
    y = batched_fft("irfft", u_f * k_f, n_fft)[..., :length]  # (B, H, L)
    return jnp.swapaxes(y, 1, 2)


def _combine_linear_recurrences(first, second):
    """Composes x -> a1 x + b1 then x -> a2 x + b2 into x -> (a1 a2) x + (a2 b1 + b2)."""
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def scan_causal_ssm(
    u: jax.Array,
    log_dt: jax.Array,
    a: jax.Array,
    c: jax.Array,
    *,
    state_elements: int = SCAN_STATE_ELEMENTS,
) -> jax.Array:
    """The recurrence x_l = dA x_{l-1} + dB u_l, y_l = 2 Re(C x_l), as an associative scan.

    Args:
      u: (B, L, H).
      log_dt: (H,); a, c: (H, N/2) complex.
      state_elements: bound on G * B * L * N/2, the complex state of a group of G channels.

    Returns:
      (B, L, H) float32 (float64 for float64 inputs), without the D skip.

    No FFT and no kernel, but the whole (B, L, H, N/2) complex state is materialised, and
    in the backward pass too: 8 B L H N / 2 bytes, e.g. 2.4 GB per direction at B=1, L=16384,
    H=1152, N=64. Channel groups therefore run one after another, each rematerialised, which
    bounds memory by `state_elements` instead.
    """
    batch, length, channels = u.shape
    half = a.shape[1]
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    da, db = discretize_zoh(jnp.exp(log_dt), a)

    def run(u, da, db, c):  # (G, B, L), (G, N/2) x 3 -> (G, B, L)
        inputs = db[:, None, None, :] * u[..., None]  # (G, B, L, N/2)
        decays = jnp.broadcast_to(da[:, None, None, :], inputs.shape)
        _, states = jax.lax.associative_scan(_combine_linear_recurrences, (decays, inputs), axis=2)
        return 2 * jnp.einsum("gn,gbln->gbl", c, states).real

    group = _group_size(channels, batch * length * half, state_elements)
    y = _over_channel_groups(run, group, jnp.moveaxis(u.astype(dtype), 2, 0), da, db, c)
    return jnp.moveaxis(y, 0, 2)


def _chunked_channel_major(
    u: jax.Array,
    log_dt: jax.Array,
    a: jax.Array,
    c: jax.Array,
    skip: jax.Array | None,
    chunk_size: int,
    dtype=None,
) -> jax.Array:
    """`chunked_causal_ssm` on channel-major data: u (H, B, L) -> (H, B, L) in `dtype` (unset:
    float32, or float64 for float64 inputs)."""
    channels, batch, length = u.shape
    half = a.shape[1]
    dtype = jnp.promote_types(u.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
    operand_dtype = u.dtype if u.dtype == jnp.bfloat16 else dtype
    size = min(chunk_size, length)
    num_chunks = -(-length // size)

    dt = jnp.exp(log_dt)
    da, db = discretize_zoh(dt, a)
    log_da = dt[:, None] * a
    powers = _powers(log_da, size)  # (H, N/2, T): dA^t
    taps = 2 * jnp.einsum("hn,hnt->ht", c * db, powers).real  # K[0..T-1], (H, T)
    if skip is not None:  # D u is a convolution with D at lag 0
        taps = taps.at[:, 0].add(skip.astype(taps.dtype))
    toeplitz = _lower_toeplitz(taps)  # (H, T, T): [h, t, r]
    to_state = _real_and_imag(db[:, :, None] * powers[:, :, ::-1], axis=1)  # (H, N, T)
    readout = c[:, :, None] * da[:, :, None] * powers  # (H, N/2, T): C dA^(t+1)
    readout = 2 * jnp.concatenate([readout.real, -readout.imag], axis=1)  # (H, N, T)

    u = jnp.pad(u.astype(operand_dtype), ((0, 0), (0, 0), (0, num_chunks * size - length)))
    u = u.reshape(channels, batch, num_chunks, size)

    def matmul(equation, x, y):
        # Not preferred_element_type=float32: XLA:CPU has no bf16 x bf16 -> f32 dot. Accelerators
        # accumulate bf16 dots in float32 anyway; only the result is rounded to bf16.
        return jnp.einsum(equation, x.astype(operand_dtype), y.astype(operand_dtype)).astype(dtype)

    ends = matmul("hbcr,hkr->chbk", u, to_state)  # (chunks, H, B, N)
    ends = ends[..., :half] + 1j * ends[..., half:]
    decay = jnp.exp(log_da * size)[:, None, :]  # dA^T, (H, 1, N/2)

    def carry(entering, end):  # (H, B, N/2) state entering a chunk, and leaving it
        return decay * entering + end, entering

    # A sequential scan over the L/T chunks: its backward pass stores one state per chunk, where
    # an associative scan would store log2(L/T) levels of them (2x the temp memory at L=4096).
    _, entering = jax.lax.scan(carry, jnp.zeros_like(ends[0]), ends)  # (chunks, H, B, N/2)
    y = matmul("hbcr,htr->hbct", u, toeplitz)
    y = y + matmul("chbk,hkt->hbct", _real_and_imag(entering, axis=-1), readout)
    return y.reshape(channels, batch, num_chunks * size)[..., :length]


def chunked_causal_ssm(
    u: jax.Array,
    log_dt: jax.Array,
    a: jax.Array,
    c: jax.Array,
    *,
    skip: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """The SSM as dense matmuls over chunks of T = chunk_size steps.

    Args:
      u: (B, L, H); any L (the last chunk is zero-padded, which causality makes harmless).
      log_dt: (H,); a, c: (H, N/2) complex.
      skip: optional D (H,), folded into the Toeplitz diagonal (no extra pass over u).
      chunk_size: T.

    Returns:
      (B, L, H) float32 (float64 for float64 inputs).

    With chunks of T steps, state s_j at the end of chunk j, and t, r < T positions in a chunk:
      inside    y[jT + t] += sum_{r<=t} K[t - r] u[jT + r]   (H, T, T) Toeplitz of K[:T]
      to state  e_j = sum_r dA^(T-1-r) dB u[jT + r]          (H, N/2, T) matrix
      carry     s_j = dA^T s_{j-1} + e_j                     a scan over the L/T chunks
      readout   y[jT + t] += 2 Re sum_n C dA^(t+1) s_{j-1}   (H, T, N/2) matrix
    Everything but the (L/T, H, B, N/2) carry is a matmul batched over channels; the data is
    laid out channel-major (H, B, L/T, T) once so that the channel is every matmul's batch axis.
    bfloat16 inputs give bfloat16 matmul operands (for the accelerators' matrix units); the state
    and its scan stay complex64.
    """
    y = _chunked_channel_major(jnp.moveaxis(u, 2, 0), log_dt, a, c, skip, chunk_size)
    return jnp.moveaxis(y, 0, 2)


def causal_ssm(u: jax.Array, params: SSMParams, settings: SSMSettings = SSMSettings()) -> jax.Array:
    """y = SSM(u) + D u, causal along axis 1. u (B, L, H) -> (B, L, H) float32 (or float64).

    params = (log_dt (H,), a (H, N/2), c (H, N/2), d (H,)); `settings.backend` picks how (module
    doc), with `settings.chunk_size` for the chunked one. D u is a convolution with D at lag 0, so
    fft and chunked fold it into their kernels.
    """
    log_dt, a, c, d = params
    backend, chunk_size = settings.backend, settings.chunk_size
    if backend == "fft":
        kernel = s4d_kernel(log_dt, a, c, u.shape[1])
        return fft_causal_conv(u, kernel.at[:, 0].add(d.astype(kernel.dtype)))
    if backend == "chunked":
        return chunked_causal_ssm(u, log_dt, a, c, skip=d, chunk_size=chunk_size)
    if backend == "scan":
        y = scan_causal_ssm(u, log_dt, a, c)
        return y + d * u.astype(y.dtype)
    raise ValueError(f"unknown SSM backend {backend!r}; choose one of {BACKENDS}.")


def bidirectional_ssm(
    u: jax.Array,
    forward: SSMParams,
    backward: SSMParams,
    settings: SSMSettings = SSMSettings(),
    *,
    channels_first: bool = False,
    dtype=None,
) -> jax.Array:
    """[SSM_fwd(u), flip(SSM_bwd(flip(u)))] along the channels: (B, L, H) -> (B, L, 2H), or
    (B, 2H, L) with `channels_first` (the layout the fft and chunked backends compute in, so
    a caller that wants another layout can get it with a single transpose). `settings`: the
    backend (and chunk length) as in `causal_ssm`. `dtype`: what the SSM computes in (float32
    or float64; unset: float32, or float64 for float64 inputs); the chunked backend's matmul
    operands stay bfloat16 for bfloat16 inputs.

    The first H outputs at position l depend on u[:l+1], the last H on u[l:]. Both directions
    run as one SSM of 2H channels (their parameters concatenated), so every op is issued once:
      fft      the anti-causal half is a cross-correlation, irfft(U conj(K_bwd)): one rfft of
               u serves both halves, no flips, and one irfft returns them concatenated;
      chunked  channel-major [u, flip(u)] through one chunked pass, then the second half
               flipped back; the flips fuse into the layout changes;
      scan     two causal scans with flips.
    """
    _, length, channels = u.shape
    backend = settings.backend
    both = [jnp.concatenate([f, b]) for f, b in zip(forward, backward, strict=True)]
    dtype = jnp.promote_types(u.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
    if backend == "scan":
        u = u.astype(dtype)
        anti = jnp.flip(causal_ssm(jnp.flip(u, 1), backward, settings), 1)
        y = jnp.concatenate([causal_ssm(u, forward, settings), anti], axis=-1)
        return jnp.swapaxes(y, 1, 2) if channels_first else y
    if backend == "chunked":
        u_t = jnp.moveaxis(u, 2, 0)  # (H, B, L)
        y = _chunked_channel_major(
            jnp.concatenate([u_t, jnp.flip(u_t, -1)]),
            *both[:3],
            both[3],
            settings.chunk_size,
            dtype,
        )  # (2H, B, L)
        y = jnp.concatenate([y[:channels], jnp.flip(y[channels:], -1)])
        return jnp.moveaxis(y, 0, 1 if channels_first else 2)
    if backend != "fft":
        raise ValueError(f"unknown SSM backend {backend!r}; choose one of {BACKENDS}.")
    y = _fft_bidirectional(u, tuple(both), fft_size(2 * length - 1), dtype)  # (B, 2H, L)
    return y if channels_first else jnp.swapaxes(y, 1, 2)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _fft_bidirectional(u: jax.Array, both: SSMParams, n_fft: int, dtype) -> jax.Array:
    """The fft backend of `bidirectional_ssm`, both directions' parameters concatenated:
    u (B, L, H) -> (B, 2H, L) in `dtype` (float32 or float64).

    Rematerialised: the gradient keeps only u (in its own dtype, often bfloat16) and the
    parameters, and recomputes the kernels' spectra and u's (one rfft of 2H rows and one of
    B H rows per layer) instead of storing them: the (2, H, F) complex64 kernel spectrum is
    72 MiB per layer at L = 4096 whatever the batch, and u's spectrum 8x the bytes of a
    bfloat16 u.
    """
    batch, length, channels = u.shape
    kernels = s4d_kernel(*both[:3], length).astype(dtype)  # (2H, L)
    kernels = kernels.at[:, 0].add(both[3].astype(dtype))  # D u: D at lag 0
    kernels_f = _rows_fft(jnp.fft.rfft, kernels, n_fft).reshape(2, channels, -1)
    # Circular correlation sum_j K[j] u[l + j mod n] has no wrap-around for l, j < L <= n - L + 1.
    kernels_f = jnp.stack([kernels_f[0], jnp.conj(kernels_f[1])])  # (2, H, F)
    u_t = jnp.swapaxes(u.astype(dtype), 1, 2)  # (B, H, L)
    u_f = batched_fft("rfft", u_t, n_fft)[:, None]  # (B, 1, H, F)
    products = (u_f * kernels_f).reshape(batch, 2 * channels, -1)
    return batched_fft("irfft", products, n_fft)[..., :length]  # (B, 2H, L)


def _rows_fft(transform, rows: jax.Array, n_fft: int) -> jax.Array:
    """`transform` (rfft / irfft) of each row of a 2-D array.

    XLA:CPU's FFT needs its operand in row-major layout. On a 3-D operand produced by a
    transpose, layout assignment in a sharded (SPMD) program can pick another layout and the
    FFT fails a RET_CHECK in fft_thunk (seen with the batch split over 8 devices); flattening
    to rows first keeps the operand row-major (tests/test_training.py covers the sharded case).
    """
    return transform(rows, n=n_fft)


def _last_axis_fft(transform, x: jax.Array, n_fft: int) -> jax.Array:
    """`transform` along the last axis of (..., T), computed on 2-D rows (see `_rows_fft`)."""
    out = _rows_fft(transform, x.reshape(-1, x.shape[-1]), n_fft)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _keep_leading_axes(sharding, rank: int):
    """The operand's sharding if its last axis is whole on each device, else replicated.

    The partitioner hands over its own (GSPMD) sharding: the leading axes may be split in any
    way the mesh allows, which this keeps. The last axis (time or frequency) is never split
    by the model; should it be, the operand is gathered, which is always correct.
    """
    hlo = sharding._to_xla_hlo_sharding(rank)
    if hlo.is_replicated() or hlo.tile_assignment_dimensions()[rank - 1] == 1:
        return sharding
    return jax.sharding.GSPMDSharding.get_replicated(sharding._device_assignment)


@functools.cache
def _partitioned_transform(kind: str, n_fft: int, in_length: int, in_dtype: str):
    """A per-row transform along the last axis that the SPMD partitioner keeps sharded.

    XLA's partitioner has no rule for FFTs with sharded batch axes: it all-gathers the operand
    and every device transforms the whole global batch (with the batch over 8 devices, each
    one held and transformed all 8 devices' rows: 8x the FFT work, memory growing with the
    global batch). Rows are independent, so this op keeps the leading axes' sharding and
    transforms each device's own rows (`custom_partitioning`); its gradient is the linear
    transpose, applied the same way.

    kind: "rfft" or "irfft"; n_fft: the transform length; in_length, in_dtype: the last axis
    and dtype of the operand (needed for the transpose).
    """
    from jax.experimental.custom_partitioning import custom_partitioning

    transform = {"rfft": jnp.fft.rfft, "irfft": jnp.fft.irfft}[kind]

    def forward_local(x):
        return _last_axis_fft(transform, x, n_fft)

    def transpose_local(g):
        primal = jax.ShapeDtypeStruct((*g.shape[:-1], in_length), jnp.dtype(in_dtype))
        return jax.linear_transpose(forward_local, primal)(g)[0]

    def partitioned(fn):
        op = custom_partitioning(fn)

        def infer(mesh, arg_shapes, result_shape):
            del mesh, result_shape
            return _keep_leading_axes(arg_shapes[0].sharding, len(arg_shapes[0].shape))

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            sharding = _keep_leading_axes(arg_shapes[0].sharding, len(arg_shapes[0].shape))
            return mesh, fn, sharding, (sharding,)

        op.def_partition(
            infer_sharding_from_operands=infer,
            partition=partition,
            decode_shardings=False,  # the partitioner's own shardings, whatever the mesh
            sharding_rule="... i -> ... j",
            need_replication_factors=("i", "j"),
        )
        return op

    forward_op, transpose_op = partitioned(forward_local), partitioned(transpose_local)

    @jax.custom_vjp
    def apply(x):
        return forward_op(x)

    apply.defvjp(lambda x: (forward_op(x), None), lambda _, g: (transpose_op(g),))
    return apply


def batched_fft(kind: str, x: jax.Array, n_fft: int) -> jax.Array:
    """ "rfft" or "irfft" (`kind`) of length n_fft along the last axis of x (..., T), with the
    leading axes' sharding kept (see `_partitioned_transform`)."""
    return _partitioned_transform(kind, n_fft, x.shape[-1], jnp.dtype(x.dtype).name)(x)


# ----------------------------------------------------------------------------- references


def direct_causal_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reference O(L^2) causal convolution. u (B, L, H), kernel (H, L) -> (B, L, H)."""
    length = u.shape[1]
    lags = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]  # l - j
    toeplitz = jnp.where(lags >= 0, kernel[:, jnp.clip(lags, 0, None)], 0)  # (H, L, L)
    return jnp.einsum("hlj,bjh->blh", toeplitz, u)


def s4d_recurrence(
    u: jax.Array, log_dt: jax.Array, a: jax.Array, c: jax.Array, d: jax.Array
) -> jax.Array:
    """The SSM as an RNN: x_l = dA x_{l-1} + dB u_l, y_l = 2 Re(C x_l) + D u_l.

    u (B, L, H) -> (B, L, H). Sequential; a reference for tests, not for training.
    """
    da, db = discretize_zoh(jnp.exp(log_dt), a)

    def step(state, u_l):  # state (B, H, N/2), u_l (B, H)
        state = da * state + db * u_l[..., None]
        return state, 2 * jnp.einsum("hn,bhn->bh", c, state).real

    state0 = jnp.zeros((u.shape[0], *a.shape), da.dtype)
    _, y = jax.lax.scan(step, state0, jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(y, 0, 1) + d * u


# ----------------------------------------------------------------------------- layers


class S4D(nn.Module):
    """Causal diagonal SSM over the sequence axis, one independent SSM per channel.

    (B, L, H) -> (B, L, H); any L at call time. The SSM runs in float32 (see `backend`); the
    output has the input's dtype (so bfloat16 activations stay bfloat16).

    Parameters (all float32, logical axes in brackets):
      log_dt (H,) [ssm], log_a_real (H, N/2) and a_imag (H, N/2) [ssm, state],
      c (H, N/2, 2) [ssm, state, -] real and imaginary parts, d (H,) [ssm].
    log_dt, log_a_real and a_imag are the "dynamics"; training gives them their own
    optimizer group (see `SSM_DYNAMICS_PARAMS`).

    `settings` (`SSMSettings`): state size, initialisation and backend.
    """

    features: int
    settings: SSMSettings = SSMSettings()

    def setup(self) -> None:
        # Parameters live in setup so that `BidirectionalSSM` can read both directions'
        # parameters (`ssm_params`) and fuse their FFTs.
        settings = self.settings
        half = settings.state_size // 2
        eig = s4d_eigenvalues(settings.state_size, settings.init)
        axes = ("ssm", "state")
        self.log_dt = self.param(
            "log_dt",
            nn.with_logical_partitioning(log_dt_init(settings.dt_min, settings.dt_max), ("ssm",)),
            (self.features,),
        )
        self.log_a_real = self.param(
            "log_a_real",
            nn.with_logical_partitioning(
                lambda _, shape: jnp.broadcast_to(jnp.log(-eig.real), shape).astype(jnp.float32),
                axes,
            ),
            (self.features, half),
        )
        self.a_imag = self.param(
            "a_imag",
            nn.with_logical_partitioning(
                lambda _, shape: jnp.broadcast_to(eig.imag, shape).astype(jnp.float32), axes
            ),
            (self.features, half),
        )
        # Variance 0.5 per real / imaginary part: complex C with unit variance.
        self.c_ri = self.param(
            "c",
            nn.with_logical_partitioning(nn.initializers.normal(math.sqrt(0.5)), (*axes, None)),
            (self.features, half, 2),
        )
        self.d = self.param(
            "d",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("ssm",)),
            (self.features,),
        )

    def ssm_params(self) -> SSMParams:
        """(log_dt (H,), a (H, N/2) complex64, c (H, N/2) complex64, d (H,))."""
        a = -jnp.exp(self.log_a_real) + 1j * self.a_imag
        c = self.c_ri[..., 0] + 1j * self.c_ri[..., 1]
        return self.log_dt, a, c, self.d

    def __call__(self, u: jax.Array) -> jax.Array:
        if u.ndim != 3 or u.shape[-1] != self.features:
            raise ValueError(
                f"S4D(features={self.features}) expects (B, L, {self.features}), got {u.shape}."
            )
        y = causal_ssm(u, self.ssm_params(), self.settings)
        return y.astype(u.dtype)


SSM_DYNAMICS_PARAMS = ("log_dt", "log_a_real", "a_imag")


class BidirectionalSSM(nn.Module):
    """(B, L, H) -> (B, L, 2H): [causal S4D(u), flip(S4D'(flip(u)))] with independent parameters.

    The first H channels at position l depend only on u[:l+1], the last H only on u[l:].
    `settings` as in `S4D`, for both directions; `channels_first` returns (B, 2H, L) instead
    (see `bidirectional_ssm`).
    """

    features: int
    settings: SSMSettings = SSMSettings()
    channels_first: bool = False
    dtype: Any = None  # what the SSM computes in; unset: float32 (float64 for float64 inputs)

    def setup(self) -> None:
        self.forward = S4D(self.features, self.settings)
        self.backward = S4D(self.features, self.settings)

    def __call__(self, u: jax.Array) -> jax.Array:
        if u.ndim != 3 or u.shape[-1] != self.features:
            raise ValueError(
                f"BidirectionalSSM(features={self.features}) expects (B, L, {self.features}), "
                f"got {u.shape}."
            )
        y = bidirectional_ssm(
            u,
            self.forward.ssm_params(),
            self.backward.ssm_params(),
            self.settings,
            channels_first=self.channels_first,
            dtype=self.dtype,
        )
        return y.astype(u.dtype)

    def kernels(self, length: int) -> tuple[jax.Array, jax.Array]:
        """The two halves' kernels, (H, L) each, for looking at what a layer sees.

        Channel h's causal half is y[l] = sum_j forward[h, j] u[l - j] + D u[l], its
        anti-causal half y'[l] = sum_j backward[h, j] u[l + j] + D' u[l]: forward[:, j] weighs
        the input j positions before, backward[:, j] the input j positions after.

            fwd, bwd = layer.apply(variables, 256, method="kernels")
        """
        forward, backward = self.forward.ssm_params(), self.backward.ssm_params()
        return s4d_kernel(*forward[:3], length), s4d_kernel(*backward[:3], length)
