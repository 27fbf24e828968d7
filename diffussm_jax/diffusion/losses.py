"""Training losses: the MSE of the mean prediction (eps, v or x_0), optionally min-SNR weighted,
and improved-DDPM's hybrid loss (MSE + VLB on the variance); flow matching's velocity MSE.

The hybrid loss trains the mean only through the MSE and the learned variance only through the
variational bound: the VLB sees the mean prediction through `stop_gradient`, because improved-DDPM
found the VLB gradient on the mean noisy and harmful to sample quality.

`sample_timesteps` and `training_losses` take either process (`Diffusion` or `Flow`); the flow
process's own functions live in `flow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax.diffusion import flow, gaussian
from diffussm_jax.diffusion.process import Diffusion, Flow, Process

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def sample_timesteps(rng: jax.Array, batch_size: int, diffusion: Process) -> jax.Array:
    """Training times for each example: (batch_size,).

    Gaussian: uniform int32 steps in [0, N). Flow: float32 times in [0, 1] drawn by
    `flow.sample_times` (uniform or logit-normal).
    """
    if isinstance(diffusion, Flow):
        return flow.sample_times(rng, batch_size, diffusion)
    return jax.random.randint(rng, (batch_size,), 0, diffusion.num_timesteps, dtype=jnp.int32)


def mse_weights(diffusion: Diffusion) -> np.ndarray:
    """Per-step weight of the MSE term, (N,) float64, from `diffusion.loss_weighting`.

    "none": 1. "min_snr" (Hang et al. 2023): the x_0-space weight min(SNR_t, gamma), with
    SNR_t = alpha_bar_t / (1 - alpha_bar_t), expressed for the prediction's own MSE. An error
    in eps is an error in x_0 scaled by sqrt(1 / SNR), and an error in v one scaled by
    sqrt((SNR + 1) / SNR), so the same x_0-space weight reads
        eps: min(SNR, gamma) / SNR,   v: min(SNR, gamma) / (SNR + 1),   x0: min(SNR, gamma).
    It caps the weight of the low-noise steps, whose easy denoising otherwise dominates the
    gradient, and so speeds up convergence.
    """
    if diffusion.loss_weighting == "none":
        return np.ones(diffusion.num_timesteps)
    snr = diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)
    clipped = np.minimum(snr, diffusion.min_snr_gamma)
    if diffusion.prediction == "eps":
        return clipped / snr
    if diffusion.prediction == "v":
        return clipped / (snr + 1.0)
    return clipped


def vb_terms_bpd(
    diffusion: Diffusion,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
) -> jax.Array:
    """One term of the variational bound per example, in bits per dimension.

    t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0: the decoder's discretised Gaussian
    negative log-likelihood of x_0. Both are averaged over the non-batch dimensions.

    Args:
      model_output: (B, ..., C) mean prediction, or (B, ..., 2C) with learned sigma.
      x_start, x_t: (B, ..., C).
      t: (B,) int steps of this chain.

    Returns:
      (B,) float.
    """
    true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(diffusion, x_start, x_t, t)
    model = gaussian.p_mean_variance(diffusion, model_output, x_t, t)
    kl = gaussian.normal_kl(true_mean, true_log_variance, model["mean"], model["log_variance"])
    kl = gaussian.mean_flat(jnp.broadcast_to(kl, x_t.shape)) / math.log(2.0)
    decoder_log_likelihood = gaussian.discretized_gaussian_log_likelihood(
        x_start.astype(kl.dtype), model["mean"], 0.5 * model["log_variance"]
    )
    decoder_nll = -gaussian.mean_flat(jnp.broadcast_to(decoder_log_likelihood, x_t.shape))
    return jnp.where(t == 0, decoder_nll / math.log(2.0), kl)


def losses_from_model_output(
    diffusion: Diffusion,
    model_output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
) -> dict[str, jax.Array]:
    """Per-example loss terms given the model's output at (x_t, t).

    loss = w_t * mse + vb, where mse = mean((target - prediction)^2) with the target of
    `diffusion.prediction` (noise, x_0 or v), w_t = `mse_weights(diffusion)[t]`, and, for the
    hybrid loss, vb is `vb_terms_bpd` with the prediction detached, multiplied by N / 1000
    (improved-DDPM's rescaling, which keeps the VLB from dominating the MSE on shorter chains;
    1 at N = 1000). For loss "mse", vb is 0.

    Args:
      model_output: (B, ..., C), or (B, ..., 2C) when sigma is learned.
      x_start, x_t, noise: (B, ..., C) with x_t = q_sample(x_start, t, noise).
      t: (B,) int steps of this chain.

    Returns:
      {"loss", "mse", "vb"}, each (B,) float32 (float64 under enable_x64 with float64 inputs);
      "mse" is unweighted.
    """
    prediction, var_values = gaussian.split_model_output(diffusion, model_output)
    dtype = jnp.promote_types(jnp.result_type(x_t), jnp.float32)
    prediction = prediction.astype(dtype)
    target = gaussian.prediction_target(diffusion, x_start.astype(dtype), t, noise.astype(dtype))
    mse = gaussian.mean_flat(jnp.square(target - prediction))
    weight = jnp.asarray(mse_weights(diffusion), dtype)[t]
    if diffusion.loss == "hybrid":
        frozen_output = jnp.concatenate(
            [jax.lax.stop_gradient(prediction), var_values.astype(dtype)], axis=-1
        )
        vb = vb_terms_bpd(diffusion, frozen_output, x_start, x_t.astype(dtype), t)
        vb = vb * (diffusion.num_timesteps / 1000.0)
    else:
        vb = jnp.zeros_like(mse)
    return {"loss": weight * mse + vb, "mse": mse, "vb": vb}


def training_losses(
    model_fn: ModelFn,
    diffusion: Process,
    x_start: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Noises x_0 to time t, runs the model and returns the per-example loss terms.

    Args:
      model_fn: (x (B, H, W, C), t (B,), y (B,) or None) -> output. Gaussian: t is int32 on the
        original scale; flow: float32 in [0, 1] (see `flow.training_losses`).
      diffusion: the process (`create` or `create_flow`).
      x_start: (B, H, W, C) clean data (scaled VAE latents in the paper).
      t: (B,) times from `sample_timesteps`: int32 steps of this chain, or flow times.
      noise: (B, H, W, C) standard normal.
      labels: (B,) int class labels, or None for an unconditional model.

    Returns:
      {"loss", "mse", "vb"}, each (B,); average "loss" to train. "mse" is the unweighted MSE,
      "vb" the hybrid loss's VLB term (0 otherwise).
    """
    if isinstance(diffusion, Flow):
        return flow.training_losses(model_fn, diffusion, x_start, t, noise, labels)
    x_t = gaussian.q_sample(diffusion, x_start, t, noise)
    model_t = jnp.asarray(diffusion.timestep_map, dtype=jnp.int32)[t]
    model_output = model_fn(x_t, model_t, labels)
    return losses_from_model_output(diffusion, model_output, x_start, x_t, t, noise)


def timestep_bucket_losses(
    values: jax.Array, t: jax.Array, num_timesteps: int, num_buckets: int = 4
) -> dict[str, jax.Array]:
    """Per-bucket sums, counts and means of a per-example loss, buckets being equal ranges of t.

    With 4 buckets these are the quartiles of t, the usual way to see which noise levels a model
    still gets wrong. Sums and counts can be accumulated over steps or devices before dividing.

    Args:
      values: (B,) per-example losses.
      t: (B,) int steps in [0, num_timesteps), or float times in [0, num_timesteps] (flow:
        num_timesteps = 1; t = num_timesteps falls in the last bucket).
      num_timesteps: N, the length of t's range.
      num_buckets: K, static.

    Returns:
      {"sum": (K,), "count": (K,), "mean": (K,)}; "mean" is NaN for an empty bucket.
    """
    if jnp.issubdtype(t.dtype, jnp.floating):
        scaled = jnp.floor(t * (num_buckets / num_timesteps)).astype(jnp.int32)
        bucket = jnp.clip(scaled, 0, num_buckets - 1)
    else:
        bucket = (t.astype(jnp.int32) * num_buckets) // num_timesteps
    one_hot = jax.nn.one_hot(bucket, num_buckets, dtype=values.dtype)
    sums = one_hot.T @ values
    counts = jnp.sum(one_hot, axis=0)
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)
    return {"sum": sums, "count": counts, "mean": means}
