"""Flow matching with the linear interpolant (SiT, Ma et al. 2024) as pure functions of arrays.

The convention, which is the public contract of this module:

    x_t = (1 - t) x_0 + t eps,   t in [0, 1],  t = 0 is data, t = 1 is noise, eps ~ N(0, I)
    the network predicts the velocity  v = d x_t / dt = eps - x_0
    model_fn(x (B, H, W, C), t (B,) float32 in [0, 1], y (B,) or None) -> v (B, H, W, C)

The network itself scales t for its timestep embedding (the models' `timestep_scale`, 1000 for
flow, so that t spans the frequencies that the Gaussian process's steps 0..999 do).

Training regresses v on eps - x_0 (`training_losses`); the minimiser is the velocity field
u(x, t) = E[eps - x_0 | x_t = x], whose ODE dx/dt = u(x, t), run from x_1 ~ N(0, I) at t = 1 down
to t = 0, carries the noise exactly onto the data distribution. The samplers integrate that ODE
on an evenly spaced time grid with Euler or Heun's method (`euler_loop`, `heun_loop`); `sample`
in `samplers` adds guidance, the initial noise and jit around them.

The x_0 estimate of a velocity is x_t - t v: it has no 1 / sqrt(alpha_bar) amplification near
the noise end, which is why the Gaussian samplers' x_0 clip has no counterpart here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax.diffusion import gaussian
from diffussm_jax.diffusion.process import Flow

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
SAMPLERS = ("euler", "heun")


def sample_times(rng: jax.Array, batch_size: int, flow: Flow) -> jax.Array:
    """Training times t (batch_size,) float32 in [0, 1].

    "uniform": U[0, 1). "logit_normal": sigmoid(logit_mean + logit_std * z), z ~ N(0, 1).
    """
    if flow.t_sampling == "uniform":
        return jax.random.uniform(rng, (batch_size,), jnp.float32)
    logits = flow.logit_mean + flow.logit_std * jax.random.normal(rng, (batch_size,), jnp.float32)
    return jax.nn.sigmoid(logits)


def _time_like(t: jax.Array, like: jax.Array) -> jax.Array:
    """t (B,) as (B, 1, ..., 1) in the float dtype of `like` (at least float32)."""
    dtype = jnp.promote_types(jnp.result_type(like), jnp.float32)
    return t.astype(dtype).reshape(t.shape + (1,) * (like.ndim - 1))


def interpolate(x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t eps.

    Args:
      x_start: (B, ...) data x_0.
      t: (B,) float times in [0, 1].
      noise: (B, ...) standard normal eps.

    Returns:
      x_t: (B, ...).
    """
    t = _time_like(t, x_start)
    return (1.0 - t) * x_start + t * noise


def velocity_target(x_start: jax.Array, noise: jax.Array) -> jax.Array:
    """v = eps - x_0, the time derivative of `interpolate`; (B, ...)."""
    return noise - x_start


def predict_xstart(x_t: jax.Array, t: jax.Array, velocity: jax.Array) -> jax.Array:
    """x_0 = x_t - t v, the data the velocity points at; x_t, v (B, ...), t (B,)."""
    return x_t - _time_like(t, x_t) * velocity


def training_losses(
    model_fn: ModelFn,
    flow: Flow,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Interpolates x_0 to time t, runs the model and returns the velocity MSE per example.

    Args:
      model_fn: (x (B, H, W, C), t (B,) float32 in [0, 1], y (B,) or None) -> v (B, H, W, C).
      flow: from `create_flow` (the loss does not depend on it; t was drawn with it).
      x_start: (B, H, W, C) clean data.
      t: (B,) float32 times (`sample_times`).
      noise: (B, H, W, C) standard normal.
      labels: (B,) int class labels, or None.

    Returns:
      {"loss", "mse", "vb"}, each (B,): loss = mse = mean over non-batch axes of
      (v_pred - (eps - x_0))^2, and vb = 0 (the keys of the Gaussian losses, so that training
      code handles both processes alike).
    """
    del flow
    dtype = jnp.promote_types(jnp.result_type(x_start), jnp.float32)
    x_start, noise = x_start.astype(dtype), noise.astype(dtype)
    x_t = interpolate(x_start, t, noise)
    velocity = model_fn(x_t, t.astype(jnp.float32), labels).astype(dtype)
    mse = gaussian.mean_flat(jnp.square(velocity - velocity_target(x_start, noise)))
    return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}


def time_grid(steps: int) -> np.ndarray:
    """(steps + 1,) float64 times from 1 (noise) down to 0 (data), evenly spaced."""
    if int(steps) < 1:
        raise ValueError(f"flow sampling needs steps >= 1, got {steps}")
    return np.linspace(1.0, 0.0, int(steps) + 1)


# The loops take `call_model(x, t)` (t: scalar time; the caller broadcasts it over the batch and
# applies guidance), the initial noise x (B, H, W, C) and the time grid, and return x at t = 0.


def euler_loop(call_model, x: jax.Array, times: np.ndarray, constrain) -> jax.Array:
    """Euler's method on dx/dt = v(x, t): x <- x + (t_next - t) v(x, t); one model call a step.

    For the linear interpolant this is DDIM (eta = 0) on the same grid: the update equals
    x <- (t_next / t) x + (1 - t_next / t) x_0_hat with x_0_hat = x - t v.
    """
    grid = jnp.asarray(times, x.dtype)

    def body(step, x):
        t, t_next = grid[step], grid[step + 1]
        velocity = call_model(x, t).astype(x.dtype)
        return constrain((x + (t_next - t) * velocity).astype(x.dtype))

    return jax.lax.fori_loop(0, len(times) - 1, body, x)


def heun_loop(call_model, x: jax.Array, times: np.ndarray, constrain) -> jax.Array:
    """Heun's method (explicit trapezoid, second order): two model calls a step, 2N in all.

    Per step: x' = x + dt v(x, t), then x <- x + dt (v(x, t) + v(x', t_next)) / 2. The final
    step ends at t = 0, where the exact velocity is finite (E[eps | x_0] - x_0 = -x_0), so it is
    second order too.

    The loop runs over the 2N model calls rather than the N steps, so the model is traced once
    (one copy of the network in the compiled program) instead of twice: even iterations are the
    predictor, odd ones the corrector, selected elementwise.
    """
    grid = jnp.asarray(times, x.dtype)

    def body(call, carry):
        x, x_predicted, first_velocity = carry
        step, corrector = call // 2, call % 2 == 1
        t, t_next = grid[step], grid[step + 1]
        dt = t_next - t
        velocity = call_model(
            jnp.where(corrector, x_predicted, x), jnp.where(corrector, t_next, t)
        ).astype(x.dtype)
        predicted = constrain((x + dt * velocity).astype(x.dtype))
        corrected = constrain((x + 0.5 * dt * (first_velocity + velocity)).astype(x.dtype))
        return (
            jnp.where(corrector, corrected, x),
            jnp.where(corrector, x_predicted, predicted),
            jnp.where(corrector, first_velocity, velocity),
        )

    carry = (x, jnp.zeros_like(x), jnp.zeros_like(x))
    x, _, _ = jax.lax.fori_loop(0, 2 * (len(times) - 1), body, carry)
    return x
