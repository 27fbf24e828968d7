"""Gaussian diffusion for DiffuSSM/DiT: schedules, losses and samplers as pure functions.

No networks live here; a model enters only as `model_fn(x, t, y)`:
  x (B, H, W, C) float, t (B,) int32 on the original T-step scale (always, even when sampling a
  respaced chain), y (B,) int labels or None; returns (B, H, W, C) eps, or (B, H, W, 2C) (eps, v)
  when sigma is learned.

Typical use:

    from diffussm_jax import diffusion

    DIFFUSION = diffusion.create()            # T=1000, linear betas, learned sigma, hybrid loss

    def loss_fn(params, x_start, labels, rng):
        t_rng, noise_rng = jax.random.split(rng)
        t = diffusion.sample_timesteps(t_rng, x_start.shape[0], DIFFUSION)
        noise = jax.random.normal(noise_rng, x_start.shape)
        model_fn = lambda x, t, y: model.apply(params, x, t, y)
        terms = diffusion.training_losses(model_fn, DIFFUSION, x_start, t, noise, labels)
        return terms["loss"].mean(), terms

    samples = diffusion.sample(model_fn, DIFFUSION, (B, 32, 32, 4), rng, sampler="ddpm",
                               steps=250, cfg_scale=1.5, labels=labels, null_label=1000)

`DIFFUSION` holds float64 numpy arrays and is closed over inside jit (its arrays become float32
constants). See docs/samplers.md for the sampling protocol of the paper's numbers.

Modules: `schedules` (betas), `respacing` (timestep respacing), `process` (the `Diffusion` object),
`gaussian` (q/posterior/p math, KL, discretised likelihood), `losses`, `samplers`.
"""

from diffussm_jax.diffusion.gaussian import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_posterior_mean_variance,
    q_sample,
)
from diffussm_jax.diffusion.losses import (
    losses_from_model_output,
    sample_timesteps,
    timestep_bucket_losses,
    training_losses,
    vb_terms_bpd,
)
from diffussm_jax.diffusion.process import Diffusion, create, from_betas, respace
from diffussm_jax.diffusion.respacing import respace_betas, space_timesteps
from diffussm_jax.diffusion.samplers import SAMPLERS, guided_model_fn, sample, spacing_for
from diffussm_jax.diffusion.schedules import betas_for_schedule, cosine_betas, linear_betas

__all__ = [
    "SAMPLERS",
    "Diffusion",
    "betas_for_schedule",
    "cosine_betas",
    "create",
    "discretized_gaussian_log_likelihood",
    "from_betas",
    "guided_model_fn",
    "linear_betas",
    "losses_from_model_output",
    "normal_kl",
    "p_mean_variance",
    "predict_eps_from_xstart",
    "predict_xstart_from_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "respace_betas",
    "sample",
    "sample_timesteps",
    "space_timesteps",
    "spacing_for",
    "timestep_bucket_losses",
    "training_losses",
    "vb_terms_bpd",
]
