"""References for tests: the O(L^2) causal convolution and the SSM run as an RNN."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffussm_jax.ssm.kernels import discretize_zoh


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
