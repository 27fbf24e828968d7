"""Diffusion processes for DiffuSSM/DiT: schedules, losses and samplers as pure functions.

Two processes, each a static object closed over inside jit:
  - `create(...)`: Gaussian diffusion (DDPM/DiT, the paper's recipe and the default), with the
    network predicting eps (default), v or x_0 (`prediction=`), optionally min-SNR weighted
    (`loss_weighting="min_snr"`); samplers "ddpm", "ddim", "dpm++2m".
  - `create_flow(...)`: linear-interpolant flow matching (SiT), x_t = (1 - t) x_0 + t eps, the
    network predicting the velocity eps - x_0; t uniform or logit-normal; samplers "euler",
    "heun". docs/objectives.md compares the options.

No networks live here; a model enters only as `model_fn(x, t, y)`:
  x (B, H, W, C) float, y (B,) int labels or None, and
  - Gaussian: t (B,) int32 on the original T-step scale (always, even when sampling a respaced
    chain); returns (B, H, W, C) mean prediction, or (B, H, W, 2C) (prediction, variance
    interpolation) when sigma is learned.
  - Flow: t (B,) float32 in [0, 1]; returns the velocity (B, H, W, C).

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

The same code trains and samples a flow model with `FLOW = diffusion.create_flow()` in place of
`DIFFUSION` (t is then float32 in [0, 1]) and `sampler="heun", steps=50`.

`DIFFUSION` holds float64 numpy arrays and is closed over inside jit (its arrays become float32
constants). See docs/samplers.md for the sampling protocol of the paper's numbers.

Modules: `schedules` (betas), `respacing` (timestep respacing), `process` (the `Diffusion` and
`Flow` objects), `gaussian` (q/posterior/p math, prediction conversions, KL, discretised
likelihood), `flow` (the flow's interpolant, loss and ODE steps), `losses`, `samplers`.
"""

from diffussm_jax.diffusion import flow
from diffussm_jax.diffusion.flow import SAMPLERS as FLOW_SAMPLERS
from diffussm_jax.diffusion.gaussian import (
    discretized_gaussian_log_likelihood,
    eps_and_xstart,
    normal_kl,
    p_mean_variance,
    predict_eps_from_v,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    predict_xstart_from_v,
    prediction_target,
    q_posterior_mean_variance,
    q_sample,
    v_from_xstart_and_eps,
)
from diffussm_jax.diffusion.losses import (
    losses_from_model_output,
    mse_weights,
    sample_timesteps,
    timestep_bucket_losses,
    training_losses,
    vb_terms_bpd,
)
from diffussm_jax.diffusion.process import (
    Diffusion,
    Flow,
    Process,
    create,
    create_flow,
    from_betas,
    respace,
)
from diffussm_jax.diffusion.respacing import respace_betas, space_timesteps
from diffussm_jax.diffusion.samplers import (
    SAMPLERS,
    check_sampler,
    guided_model_fn,
    sample,
    samplers_for,
    spacing_for,
)
from diffussm_jax.diffusion.schedules import betas_for_schedule, cosine_betas, linear_betas

__all__ = [
    "FLOW_SAMPLERS",
    "SAMPLERS",
    "Diffusion",
    "Flow",
    "Process",
    "betas_for_schedule",
    "check_sampler",
    "cosine_betas",
    "create",
    "create_flow",
    "discretized_gaussian_log_likelihood",
    "eps_and_xstart",
    "flow",
    "from_betas",
    "guided_model_fn",
    "linear_betas",
    "losses_from_model_output",
    "mse_weights",
    "normal_kl",
    "p_mean_variance",
    "predict_eps_from_v",
    "predict_eps_from_xstart",
    "predict_xstart_from_eps",
    "predict_xstart_from_v",
    "prediction_target",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "respace_betas",
    "sample",
    "sample_timesteps",
    "samplers_for",
    "space_timesteps",
    "spacing_for",
    "timestep_bucket_losses",
    "training_losses",
    "v_from_xstart_and_eps",
    "vb_terms_bpd",
]
