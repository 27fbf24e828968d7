"""The Linen layers that own an SSM's parameters: `S4D` (causal) and `BidirectionalSSM`."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffussm_jax.ssm.backends import bidirectional_ssm, causal_ssm
from diffussm_jax.ssm.kernels import log_dt_init, s4d_eigenvalues, s4d_kernel
from diffussm_jax.ssm.settings import SSMParams, SSMSettings


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
