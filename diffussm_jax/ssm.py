"""Diagonal state space layers (S4D) applied as long convolutions.

The math is a set of pure functions of arrays, so it can be checked against float64 references:

  s4d_eigenvalues      A's N/2 complex modes for the Lin / Inv / LegS initialisations
  discretize_zoh       zero-order hold: (dt, A) -> (dA, dB)
  s4d_kernel           K[h, l] = 2 Re sum_n C[h,n] dB[h,n] dA[h,n]^l, generated in chunks of l
  fft_causal_conv      y = irfft(rfft(u, 2L) * rfft(K, 2L))[:L]   (zero padding: no wrap-around)
  direct_causal_conv   the O(L^2) sum, for tests
  s4d_recurrence       the SSM run as an RNN (sequential scan), for tests

`S4D` and `BidirectionalSSM` are thin Linen layers that own the parameters. The kernel
depends only on the parameters, so it is generated once per call, not per example, and in
float32/complex64 whatever the activation dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

InitName = Literal["lin", "inv", "legs"]
INITS = ("lin", "inv", "legs")

# Kernel generation works on (channels, N/2, chunk) complex64 blocks of at most this many
# elements (16 MiB), so the (channels, N/2, L) tensor never exists at once.
KERNEL_CHUNK_ELEMENTS = 1 << 21


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


def _kernel_block(log_da: jax.Array, cdb: jax.Array, positions: jax.Array) -> jax.Array:
    """2 Re sum_n cdb[h,n] exp(log_da[h,n] * l) for l in positions -> (H, len(positions)).

    Powers are taken as exp(l * dt A) rather than by repeated multiplication: it costs the
    same here and does not accumulate rounding error over long sequences.
    """
    vandermonde = jnp.exp(log_da[:, :, None] * positions.astype(jnp.float32))
    return 2 * jnp.einsum("hn,hnl->hl", cdb, vandermonde).real


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
      chunk_elements: bound on H * N/2 * chunk, the largest complex block alive at once.

    Returns:
      (H, L) float32 (float64 if the inputs are).

    Generated in chunks of positions inside a scan whose body is rematerialised, so neither the
    forward nor the backward pass holds an (H, N/2, L) complex tensor.
    """
    dt = jnp.exp(log_dt)
    _, db = discretize_zoh(dt, a)
    log_da = dt[:, None] * a
    cdb = c * db
    channels, half = a.shape
    chunk = max(1, min(length, chunk_elements // max(1, channels * half)))
    if chunk >= length:
        return _kernel_block(log_da, cdb, jnp.arange(length))
    num_chunks = -(-length // chunk)
    starts = jnp.arange(num_chunks) * chunk

    @jax.checkpoint
    def body(carry, start):
        return carry, _kernel_block(log_da, cdb, start + jnp.arange(chunk))

    _, blocks = jax.lax.scan(body, None, starts)  # (num_chunks, H, chunk)
    kernel = jnp.moveaxis(blocks, 0, 1).reshape(channels, num_chunks * chunk)
    return kernel[:, :length]


def fft_causal_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """Causal convolution y[l] = sum_{j<=l} K[j] u[l-j] along axis 1 via FFT.

    Args:
      u: (B, L, H), computed in float32 (float64 inputs stay float64).
      kernel: (H, L).

    Returns:
      (B, L, H) in the promoted float dtype. Zero padding to 2L keeps it causal: the circular
      convolution of length 2L has no wrap-around for sequences of length L.
    """
    length = u.shape[1]
    n_fft = 2 * length
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    u_f = jnp.fft.rfft(u.astype(dtype), n=n_fft, axis=1)
    k_f = jnp.fft.rfft(kernel.astype(dtype), n=n_fft, axis=1)
    y = jnp.fft.irfft(u_f * k_f.T[None], n=n_fft, axis=1)
    return y[:, :length]


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


class S4DModule(nn.Module):
    """Causal diagonal SSM over the sequence axis, one independent SSM per channel.

    Build it with `S4D(features, init=...)`: Linen reserves the attribute name `init` for its
    method, so the field here is `ssm_init`.

    (B, L, H) -> (B, L, H); any L at call time. The kernel and the FFT run in float32; the
    output has the input's dtype (so bfloat16 activations stay bfloat16).

    Parameters (all float32, logical axes in brackets):
      log_dt (H,) [ssm], log_a_real (H, N/2) and a_imag (H, N/2) [ssm, state],
      c (H, N/2, 2) [ssm, state, -] real and imaginary parts, d (H,) [ssm].
    log_dt, log_a_real and a_imag are the "dynamics"; training gives them their own
    optimizer group (see `SSM_DYNAMICS_PARAMS`).
    """

    features: int
    state_size: int = 64
    ssm_init: InitName = "lin"
    dt_min: float = 0.001
    dt_max: float = 0.1

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        if u.ndim != 3 or u.shape[-1] != self.features:
            raise ValueError(
                f"S4D(features={self.features}) expects (B, L, {self.features}), got {u.shape}."
            )
        half = self.state_size // 2
        eig = s4d_eigenvalues(self.state_size, self.ssm_init)
        axes = ("ssm", "state")
        log_dt = self.param(
            "log_dt",
            nn.with_logical_partitioning(log_dt_init(self.dt_min, self.dt_max), ("ssm",)),
            (self.features,),
        )
        log_a_real = self.param(
            "log_a_real",
            nn.with_logical_partitioning(
                lambda _, shape: jnp.broadcast_to(jnp.log(-eig.real), shape).astype(jnp.float32),
                axes,
            ),
            (self.features, half),
        )
        a_imag = self.param(
            "a_imag",
            nn.with_logical_partitioning(
                lambda _, shape: jnp.broadcast_to(eig.imag, shape).astype(jnp.float32), axes
            ),
            (self.features, half),
        )
        # Variance 0.5 per real / imaginary part: complex C with unit variance.
        c_ri = self.param(
            "c",
            nn.with_logical_partitioning(nn.initializers.normal(math.sqrt(0.5)), (*axes, None)),
            (self.features, half, 2),
        )
        d = self.param(
            "d",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("ssm",)),
            (self.features,),
        )
        a = -jnp.exp(log_a_real) + 1j * a_imag
        c = c_ri[..., 0] + 1j * c_ri[..., 1]
        kernel = s4d_kernel(log_dt, a, c, u.shape[1])
        y = fft_causal_conv(u, kernel) + d * u.astype(jnp.float32)
        return y.astype(u.dtype)


SSM_DYNAMICS_PARAMS = ("log_dt", "log_a_real", "a_imag")


class BidirectionalSSMModule(nn.Module):
    """(B, L, H) -> (B, L, 2H): [causal S4D(u), flip(S4D'(flip(u)))] with independent parameters.

    The first H channels at position l depend only on u[:l+1], the last H only on u[l:].
    Build it with `BidirectionalSSM(features, init=...)`.
    """

    features: int
    state_size: int = 64
    ssm_init: InitName = "lin"
    dt_min: float = 0.001
    dt_max: float = 0.1

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        kw = dict(
            state_size=self.state_size,
            ssm_init=self.ssm_init,
            dt_min=self.dt_min,
            dt_max=self.dt_max,
        )
        forward = S4DModule(self.features, name="forward", **kw)(u)
        backward = jnp.flip(S4DModule(self.features, name="backward", **kw)(jnp.flip(u, 1)), 1)
        return jnp.concatenate([forward, backward], axis=-1)


def S4D(
    features: int,
    state_size: int = 64,
    init: InitName = "lin",
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    **module_kwargs,
) -> S4DModule:
    """Causal S4D layer (B, L, H) -> (B, L, H); see `S4DModule`."""
    return S4DModule(features, state_size, init, dt_min, dt_max, **module_kwargs)


def BidirectionalSSM(
    features: int,
    state_size: int = 64,
    init: InitName = "lin",
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    **module_kwargs,
) -> BidirectionalSSMModule:
    """Bidirectional S4D layer (B, L, H) -> (B, L, 2H); see `BidirectionalSSMModule`."""
    return BidirectionalSSMModule(features, state_size, init, dt_min, dt_max, **module_kwargs)
