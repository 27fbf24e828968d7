"""Gaussian diffusion math as pure functions of arrays.

Forward process q(x_t | x_0), true posterior q(x_{t-1} | x_t, x_0), the model's reverse step
p(x_{t-1} | x_t) from its output (its mean prediction and, with learned sigma, the "learned range"
interpolation), Gaussian KL and the discretised Gaussian log-likelihood of the decoder at t = 0.

The mean prediction is eps, x_0 or v = alpha eps - sigma x_0 (`Diffusion.prediction`), with
alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t), x_t = alpha x_0 + sigma eps. Because
alpha^2 + sigma^2 = 1, (x_t, v) is a rotation of (x_0, eps):
    x_0 = alpha x_t - sigma v,    eps = sigma x_t + alpha v.
Every conversion is affine in the prediction for fixed x_t, so classifier-free guidance on the
prediction equals guidance on eps.

Shapes: x arrays are (B, ...) (images are (B, H, W, C)); t is (B,) int32 indices into the chain of
`diffusion` (respaced indices for a respaced chain). Schedule constants are gathered at t and
broadcast over the non-batch axes, in the floating dtype of the data (float32, or float64 under
`jax.enable_x64`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from diffussm_jax.diffusion.process import Diffusion


def _compute_dtype(like: jax.Array) -> jnp.dtype:
    # bf16 activations still get float32 schedule math: bf16 cannot resolve alpha_bar near 1.
    return jnp.promote_types(jnp.result_type(like), jnp.float32)


def extract(values: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
    """values[t] shaped to broadcast against `like`.

    Args:
      values: (N,) host array of a schedule quantity.
      t: (B,) int indices.
      like: (B, ...) array whose rank and float dtype the result takes.

    Returns:
      (B, 1, ..., 1) array.
    """
    gathered = jnp.asarray(values, dtype=_compute_dtype(like))[t]
    return gathered.reshape(gathered.shape + (1,) * (jnp.ndim(like) - 1))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def q_sample(diffusion: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) given the noise.

    Args:
      x_start: (B, ...) clean data x_0.
      t: (B,) int steps.
      noise: (B, ...) standard normal.

    Returns:
      x_t: (B, ...).
    """
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
        + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(
    diffusion: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

    Args:
      x_start, x_t: (B, ...).
      t: (B,) int steps.

    Returns:
      mean (B, ...), variance (B, 1, ...), log_variance_clipped (B, 1, ...).
    """
    mean = (
        extract(diffusion.posterior_mean_coef1, t, x_t) * x_start
        + extract(diffusion.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = extract(diffusion.posterior_variance, t, x_t)
    log_variance = extract(diffusion.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_xstart_from_eps(
    diffusion: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar); all (B, ...)."""
    return (
        extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_xstart(
    diffusion: Diffusion, x_t: jax.Array, t: jax.Array, x_start: jax.Array
) -> jax.Array:
    """Inverse of `predict_xstart_from_eps`; all (B, ...)."""
    return (extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / extract(
        diffusion.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def v_from_xstart_and_eps(
    diffusion: Diffusion, x_start: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, the target of v prediction; (B, ...)."""
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, eps) * eps
        - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, eps) * x_start
    )


def predict_xstart_from_v(
    diffusion: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array
) -> jax.Array:
    """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v; all (B, ...)."""
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def predict_eps_from_v(
    diffusion: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array
) -> jax.Array:
    """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v; all (B, ...)."""
    return (
        extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + extract(diffusion.sqrt_alphas_cumprod, t, x_t) * v
    )


def prediction_target(
    diffusion: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """What the mean channels are trained to output at (x_0, t, eps): (B, ...)."""
    if diffusion.prediction == "eps":
        return noise
    if diffusion.prediction == "x0":
        return x_start
    return v_from_xstart_and_eps(diffusion, x_start, t, noise)


def eps_and_xstart(
    diffusion: Diffusion, prediction: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The (eps, x_0) estimates implied by the mean prediction (`diffusion.prediction`).

    Args:
      prediction: (B, ..., C) the model's mean channels (eps, x_0 or v).
      x_t: (B, ..., C).
      t: (B,) int steps of this chain.

    Returns:
      eps, x_0: each (B, ..., C), in the float dtype of x_t (at least float32).
    """
    prediction = prediction.astype(_compute_dtype(x_t))
    if diffusion.prediction == "eps":
        return prediction, predict_xstart_from_eps(diffusion, x_t, t, prediction)
    if diffusion.prediction == "x0":
        return predict_eps_from_xstart(diffusion, x_t, t, prediction), prediction
    return (
        predict_eps_from_v(diffusion, x_t, t, prediction),
        predict_xstart_from_v(diffusion, x_t, t, prediction),
    )


def split_model_output(
    diffusion: Diffusion, model_output: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Splits (B, ..., 2C) into the mean prediction (B, ..., C) and the variance interpolation
    v (B, ..., C) when sigma is learned.

    Without learned sigma the output is the mean prediction (B, ..., C) and v is None.
    """
    if not diffusion.learn_sigma:
        return model_output, None
    channels = model_output.shape[-1]
    if channels % 2:
        raise ValueError(f"learned sigma needs 2C output channels, got {channels}")
    return model_output[..., : channels // 2], model_output[..., channels // 2 :]


def model_log_variance(
    diffusion: Diffusion, var_values: jax.Array | None, x_t: jax.Array, t: jax.Array
) -> jax.Array:
    """log variance of p(x_{t-1} | x_t).

    Learned range (improved-DDPM): frac = (v + 1) / 2 interpolates between the two natural
    bounds, log var = frac * log(beta_t) + (1 - frac) * log(posterior_var_t), the latter clipped at
    t = 0. v is nominally in [-1, 1] but is not clamped, as in ADM/DiT.

    Fixed: "large" uses beta_t (with the t = 0 entry taken from the posterior variance at t = 1 so
    the decoder is not too wide), "small" uses the clipped posterior variance.

    Args:
      var_values: (B, ..., C) model's v, or None when sigma is not learned.
      x_t: (B, ..., C).
      t: (B,) int steps.

    Returns:
      (B, ..., C) when learned, else (B, 1, ..., 1).
    """
    if var_values is not None:
        min_log = extract(diffusion.posterior_log_variance_clipped, t, x_t)
        max_log = extract(np.log(diffusion.betas), t, x_t)
        frac = (var_values.astype(min_log.dtype) + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    if diffusion.fixed_variance == "small":
        return extract(diffusion.posterior_log_variance_clipped, t, x_t)
    large = diffusion.betas.copy()
    if large.shape[0] > 1:
        large[0] = diffusion.posterior_variance[1]
    return extract(np.log(large), t, x_t)


def p_mean_variance(
    diffusion: Diffusion,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """The model's reverse step p(x_{t-1} | x_t) = N(mean, exp(log_variance)).

    The mean is the true posterior mean with x_0 replaced by the model's estimate (from its eps,
    x_0 or v prediction).

    Args:
      model_output: (B, ..., C) mean prediction, or (B, ..., 2C) (prediction, variance
        interpolation) when sigma is learned.
      x_t: (B, ..., C).
      t: (B,) int steps of this chain.
      clip_denoised: clip the x_0 estimate to [-1, 1] (pixels; keep False for latents).

    Returns:
      dict with "mean" (B, ..., C), "log_variance" (broadcastable to x_t), "pred_xstart" and
      "eps" (B, ..., C); "eps" is implied by the unclipped prediction.
    """
    prediction, var_values = split_model_output(diffusion, model_output)
    eps, pred_xstart = eps_and_xstart(diffusion, prediction, x_t, t)
    log_variance = model_log_variance(diffusion, var_values, x_t, t)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(diffusion, pred_xstart, x_t, t)
    return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: jax.Array, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """log P(x) for data quantised to 256 levels in [-1, 1] under N(means, exp(log_scales)^2).

    Each value owns the bin [x - 1/255, x + 1/255]; the two end bins extend to -inf and +inf
    (values below -0.999 / above 0.999). Uses the exact normal CDF (ADM uses a tanh approximation;
    the difference is below 1e-3 relative and only affects the VLB term of the loss).

    Args:
      x: (B, ...) data in [-1, 1].
      means, log_scales: broadcastable to x.

    Returns:
      (B, ...) log-probabilities in nats, floored at log(1e-12) as ADM does.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    upper = inv_stdv * (centered + 1.0 / 255.0)
    lower = inv_stdv * (centered - 1.0 / 255.0)
    # Take the CDF difference on the side of the mean nearer the bin: in the far upper tail both
    # CDFs round to 1 and their difference to 0, while the mirrored lower-tail values stay exact.
    bin_mass = jnp.where(centered > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_bin = jnp.log(jnp.maximum(bin_mass, 1e-12))
    log_left_tail = jnp.maximum(log_ndtr(upper), np.log(1e-12))
    log_right_tail = jnp.maximum(log_ndtr(-lower), np.log(1e-12))
    return jnp.where(x < -0.999, log_left_tail, jnp.where(x > 0.999, log_right_tail, log_bin))
