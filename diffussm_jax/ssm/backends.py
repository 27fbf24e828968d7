"""The three ways to apply an SSM to a sequence (fft, scan, chunked), causal and bidirectional."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffussm_jax.ssm.kernels import (
    _group_size,
    _lower_toeplitz,
    _over_channel_groups,
    _powers,
    _real_and_imag,
    discretize_zoh,
    s4d_kernel,
)
from diffussm_jax.ssm.settings import BACKENDS, DEFAULT_CHUNK_SIZE, SSMParams, SSMSettings
from diffussm_jax.ssm.transforms import _rows_fft, batched_fft, fft_size

# The scan backend runs channel groups one after another so that its (B, L, group, N/2)
# complex64 state holds at most this many elements (64 MiB per array of the scan).
SCAN_STATE_ELEMENTS = 1 << 23


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

    params = (log_dt (H,), a (H, N/2), c (H, N/2), d (H,)); `settings.backend` picks how (the
    package doc), with `settings.chunk_size` for the chunked one. D u is a convolution with D
    at lag 0, so fft and chunked fold it into their kernels.
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
