"""Samplers: ancestral DDPM, DDIM and DPM-Solver++(2M) for the Gaussian process, Euler and Heun
for the flow process, all with classifier-free guidance.

Every sampler is one jitted program: the steps run in `lax.fori_loop`, the per-step constants are
computed on the host from the (respaced) schedule before tracing, and the per-step noise comes from
`jax.random.fold_in(key, step)`, so the result depends only on the PRNG key and no value travels
back to the host between steps.

Jitting with parameters: `model_fn` is any callable, usually a closure over the parameters:

    @jax.jit
    def generate(params, rng, labels):
        model_fn = lambda x, t, y: model.apply(params, x, t, y)
        return diffusion.sample(model_fn, DIFFUSION, (labels.shape[0], 32, 32, 4), rng,
                                sampler="ddpm", steps=250, cfg_scale=1.5, labels=labels,
                                null_label=1000)

`DIFFUSION` is closed over (its arrays become constants); `generate` compiles once and can be called
for every batch. `sample` also works outside jit (it jits itself, recompiling per call).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffussm_jax.diffusion import flow, gaussian
from diffussm_jax.diffusion.process import Flow, Process, respace

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
SAMPLERS = ("ddpm", "ddim", "dpm++2m")  # the Gaussian process's; the flow's: flow.SAMPLERS


def samplers_for(diffusion: Process) -> tuple[str, ...]:
    """The sampler names that can sample `diffusion`."""
    return flow.SAMPLERS if isinstance(diffusion, Flow) else SAMPLERS


def check_sampler(diffusion: Process, sampler: str) -> None:
    """Raises ValueError naming the valid samplers when `sampler` cannot sample `diffusion`."""
    valid = samplers_for(diffusion)
    if sampler in valid:
        return
    kind = "flow" if isinstance(diffusion, Flow) else "Gaussian"
    other = SAMPLERS if isinstance(diffusion, Flow) else flow.SAMPLERS
    hint = f" ({sampler!r} samples the other process)" if sampler in other else ""
    raise ValueError(
        f"unknown sampler {sampler!r} for the {kind} process{hint}; expected one of {valid}"
    )


def guided_model_fn(
    model_fn: ModelFn,
    cfg_scale: float | jax.Array,
    null_label: int,
    *,
    guidance_channels: int | None = None,
) -> ModelFn:
    """Classifier-free guidance as a model function of the same signature.

    The wrapped model is called once on the doubled batch [x, x] with labels [y, null_label] and
    returns, for the B conditional examples,
        eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
    on the guided channels (eps here is the mean prediction: eps, v or x_0 of the Gaussian
    process, each an affine function of eps at fixed x_t, so guiding it is guiding eps; or the
    flow's velocity); every other output channel (the learned-variance channels, and eps
    channels beyond `guidance_channels`) is taken from the conditional half, as DiT does. Scale 1
    gives the conditional model, scale 0 the unconditional eps.

    Args:
      model_fn: (x (2B, H, W, C), t (2B,), y (2B,)) -> (2B, H, W, C or 2C).
      cfg_scale: guidance scale; a Python float or a traced scalar (no recompile per scale).
      null_label: the label of the "no class" embedding (num_classes in DiT/DiffuSSM).
      guidance_channels: None guides all C eps channels (our default). 3 reproduces DiT's released
        sampler, which guided only the first 3 of the 4 latent channels; that was an artefact of its
        code (a slice written for the variance split), kept only to reproduce DiT's numbers.

    Returns:
      (x (B, H, W, C), t (B,), y (B,)) -> (B, H, W, C or 2C).
    """

    def guided(x: jax.Array, t: jax.Array, y: jax.Array | None) -> jax.Array:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels")
        null = jnp.full_like(y, null_label)
        output = model_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null])
        )
        cond, uncond = jnp.split(output, 2, axis=0)
        guided_count = x.shape[-1] if guidance_channels is None else guidance_channels
        if not 0 < guided_count <= x.shape[-1]:
            raise ValueError(f"guidance_channels must be in [1, {x.shape[-1]}], got {guided_count}")
        cond_eps, uncond_eps = cond[..., :guided_count], uncond[..., :guided_count]
        scale = jnp.asarray(cfg_scale, dtype=cond.dtype)
        guided_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        return jnp.concatenate([guided_eps, cond[..., guided_count:]], axis=-1)

    return guided


def spacing_for(sampler: str, steps: int | str) -> str:
    """The respacing spec `sample` uses for an integer step count.

    ddpm: steps spread evenly over [0, T-1] with both ends ("250", the paper's evaluation
    setting). ddim: a constant stride ("ddim50"), as in the DDIM paper. dpm++2m: evenly spaced
    log-SNR ("logsnr20"), DPM-Solver's grid for few steps; an evenly spaced time grid puts a jump
    in log-SNR between its last two steps (t = 0 and t = T/N) about 4x the previous one, where the
    second-order extrapolation overshoots. A string is used as given.
    """
    if isinstance(steps, str):
        return steps
    if sampler == "ddim":
        return f"ddim{int(steps)}"
    if sampler == "dpm++2m":
        return f"logsnr{int(steps)}"
    return str(int(steps))


# The loops below take `call_model(x, index)` (index: scalar step of `chain`, mapped to the original
# scale by the caller) and the initial x (B, H, W, C) float32, and return the final x.


def _ddpm_loop(chain, call_model, x, loop_key, constrain, clip_denoised):
    num_steps = chain.num_timesteps

    def body(step, x):
        index = num_steps - 1 - step
        t = jnp.full((x.shape[0],), index, dtype=jnp.int32)
        out = gaussian.p_mean_variance(
            chain, call_model(x, index), x, t, clip_denoised=clip_denoised
        )
        noise = jax.random.normal(jax.random.fold_in(loop_key, step), x.shape, x.dtype)
        # No noise on the last step: its output is the sample.
        scale = jnp.where(index > 0, jnp.exp(0.5 * out["log_variance"]), 0.0)
        return constrain((out["mean"] + scale * constrain(noise)).astype(x.dtype))

    return jax.lax.fori_loop(0, num_steps, body, x)


def _ddim_loop(chain, call_model, x, loop_key, constrain, clip_denoised, eta):
    num_steps = chain.num_timesteps
    channels = x.shape[-1]
    alphas_cumprod = jnp.asarray(chain.alphas_cumprod, dtype=x.dtype)
    alphas_cumprod_prev = jnp.asarray(chain.alphas_cumprod_prev, dtype=x.dtype)

    def body(step, x):
        index = num_steps - 1 - step
        t = jnp.full((x.shape[0],), index, dtype=jnp.int32)
        eps, x0 = gaussian.eps_and_xstart(chain, call_model(x, index)[..., :channels], x, t)
        eps, x0 = eps.astype(x.dtype), x0.astype(x.dtype)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            # Re-derive eps so the deterministic part of the step points at the clipped x_0.
            eps = gaussian.predict_eps_from_xstart(chain, x, t, x0)
        alpha_bar, alpha_bar_prev = alphas_cumprod[index], alphas_cumprod_prev[index]
        sigma = (
            eta
            * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
            * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev)
        )
        direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0))
        noise = jax.random.normal(jax.random.fold_in(loop_key, step), x.shape, x.dtype)
        x_next = jnp.sqrt(alpha_bar_prev) * x0 + direction * eps + sigma * constrain(noise)
        return constrain(x_next.astype(x.dtype))

    return jax.lax.fori_loop(0, num_steps, body, x)


def dpm_solver_2m_coefficients(alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step constants of DPM-Solver++(2M) (Lu et al. 2022) on a discrete grid, in float64.

    Step k (k = 0..N-1) evaluates the model at index s = N-1-k and moves to index s-1, or to clean
    data (alpha = 1, sigma = 0) after index 0. With lambda = log(alpha / sigma) and h_k the lambda
    increment, the update is
        x <- (sigma_next / sigma) * x + alpha_next * (1 - exp(-h_k)) * D_k,
        D_k = (1 + 1/(2 r_k)) x0_k - 1/(2 r_k) x0_{k-1},  r_k = h_{k-1} / h_k,
    first order (D_k = x0_k) on the first step and on the last, whose h is infinite (lower order
    at the end is what keeps few-step sampling stable).

    Args:
      alphas_cumprod: (N,) alpha_bar of the (respaced) chain; index 0 is the least noisy.

    Returns:
      dict of (N,) float64 arrays "x_scale", "d_scale", "weight_current", "weight_previous".
    """
    num_steps = alphas_cumprod.shape[0]
    order = alphas_cumprod[::-1]  # the model's evaluation order, noisiest first
    alpha = np.sqrt(order)
    sigma = np.sqrt(1.0 - order)
    lam = np.log(alpha) - np.log(sigma)
    alpha_next = np.concatenate([alpha[1:], [1.0]])
    sigma_next = np.concatenate([sigma[1:], [0.0]])
    h = np.concatenate([lam[1:] - lam[:-1], [np.inf]])
    x_scale = sigma_next / sigma
    d_scale = alpha_next * -np.expm1(-h)
    weight_current = np.ones(num_steps)
    weight_previous = np.zeros(num_steps)
    for k in range(1, num_steps - 1):
        r = h[k - 1] / h[k]
        weight_current[k] = 1.0 + 1.0 / (2.0 * r)
        weight_previous[k] = -1.0 / (2.0 * r)
    return {
        "x_scale": x_scale,
        "d_scale": d_scale,
        "weight_current": weight_current,
        "weight_previous": weight_previous,
    }


def _dpm_solver_2m_loop(chain, call_model, x, constrain, clip_denoised):
    num_steps = chain.num_timesteps
    channels = x.shape[-1]
    coefficients = {
        name: jnp.asarray(value, dtype=x.dtype)
        for name, value in dpm_solver_2m_coefficients(chain.alphas_cumprod).items()
    }

    def body(step, carry):
        x, previous_x0 = carry
        index = num_steps - 1 - step
        t = jnp.full((x.shape[0],), index, dtype=jnp.int32)
        _, x0 = gaussian.eps_and_xstart(chain, call_model(x, index)[..., :channels], x, t)
        x0 = x0.astype(x.dtype)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        d = (
            coefficients["weight_current"][step] * x0
            + coefficients["weight_previous"][step] * previous_x0
        )
        x_next = coefficients["x_scale"][step] * x + coefficients["d_scale"][step] * d
        return constrain(x_next.astype(x.dtype)), x0.astype(x.dtype)

    x, _ = jax.lax.fori_loop(0, num_steps, body, (x, jnp.zeros_like(x)))
    return x


def sample(
    model_fn: ModelFn,
    diffusion: Process,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    sampler: str = "ddpm",
    steps: int | str | None = None,
    cfg_scale: float | jax.Array | None = None,
    labels: jax.Array | None = None,
    null_label: int | None = None,
    guidance_channels: int | None = None,
    clip_denoised: bool = False,
    eta: float | jax.Array = 0.0,
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Draws samples from the reverse process of `diffusion` driven by `model_fn`.

    Args:
      model_fn: Gaussian process: (x (B, H, W, C), t (B,) int32 on the original T-step scale,
        y (B,) or None) -> (B, H, W, C) mean prediction, or (B, H, W, 2C) when
        `diffusion.learn_sigma`. Flow process: t (B,) float32 in [0, 1] -> velocity
        (B, H, W, C). With cfg it is called once per model evaluation on the doubled batch (2B)
        whose second half has y = null_label.
      diffusion: from `create` (the model's training chain, possibly already respaced) or from
        `create_flow`.
      shape: (B, H, W, C) of the samples.
      rng: PRNG key; the samples are a deterministic function of it.
      sampler: Gaussian: "ddpm" (ancestral, uses the learned variance), "ddim" (eta = 0
        deterministic) or "dpm++2m" (DPM-Solver++(2M), deterministic, good at 20-50 steps).
        Flow: "euler" (one model call a step) or "heun" (second order, two calls a step); both
        integrate the ODE from t = 1 to t = 0 on an evenly spaced grid.
      steps: Gaussian: respace `diffusion` to this many steps (`spacing_for`); a respacing string
        ("250", "ddim50", "10,15,20") is used as given; None samples `diffusion` as it is.
        Flow: the number of ODE steps, an int (required).
      cfg_scale: None for no guidance, else the classifier-free guidance scale (needs `labels` and
        `null_label`); may be a traced scalar.
      labels: (B,) int class labels, or None for an unconditional model.
      null_label: label index of the unconditional embedding (num_classes).
      guidance_channels: see `guided_model_fn`; 3 reproduces DiT's sampler.
      clip_denoised: clip each x_0 estimate to [-1, 1]; False for latents. Gaussian only: the
        flow samplers step with the velocity, whose x_0 estimate x - t v is not amplified
        near the noise end, and refuse True rather than ignore it.
      eta: DDIM noise scale (0 deterministic, 1 ancestral-like); ignored by other samplers.
      sharding: optional sharding of the (B, H, W, C) state, e.g.
        NamedSharding(mesh, P("data")); the state and per-step noise are constrained to it so
        every step stays on its devices.

    Returns:
      (B, H, W, C) float32 samples.
    """
    check_sampler(diffusion, sampler)
    is_flow = isinstance(diffusion, Flow)
    if is_flow:
        if isinstance(steps, str) or steps is None:
            raise ValueError(
                f"the flow process samples with a number of ODE steps; got steps={steps!r}"
            )
        if clip_denoised:
            raise ValueError(
                "clip_denoised=True: the flow samplers do not clip x_0 (their x_0 estimate "
                "x - t v is not amplified near the noise); pass clip_denoised=False"
            )
        times = flow.time_grid(steps)
    else:
        chain = diffusion if steps is None else respace(diffusion, spacing_for(sampler, steps))
    if cfg_scale is not None and (labels is None or null_label is None):
        raise ValueError("cfg_scale needs labels and null_label")
    shape = tuple(shape)
    if labels is not None and labels.shape != shape[:1]:
        raise ValueError(f"labels must have shape {shape[:1]}, got {labels.shape}")

    def constrain(x: jax.Array) -> jax.Array:
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    # Array inputs enter as arguments rather than closure captures, so the same code runs eagerly
    # (each is a runtime input of one compiled program) and inside the caller's jit.
    @jax.jit
    def run(rng, labels, cfg_scale, eta):
        guided = model_fn
        if cfg_scale is not None:
            guided = guided_model_fn(
                model_fn, cfg_scale, null_label, guidance_channels=guidance_channels
            )
        init_key, loop_key = jax.random.split(rng)
        x = constrain(jax.random.normal(init_key, shape, jnp.float32))
        if is_flow:

            def call_velocity(x: jax.Array, t: jax.Array) -> jax.Array:
                return guided(x, jnp.full((shape[0],), t, dtype=jnp.float32), labels)

            loop = flow.euler_loop if sampler == "euler" else flow.heun_loop
            return loop(call_velocity, x, times, constrain)

        timestep_map = jnp.asarray(chain.timestep_map, dtype=jnp.int32)

        def call_model(x: jax.Array, index: jax.Array) -> jax.Array:
            t = jnp.full((shape[0],), timestep_map[index], dtype=jnp.int32)
            return guided(x, t, labels)

        if sampler == "ddpm":
            return _ddpm_loop(chain, call_model, x, loop_key, constrain, clip_denoised)
        if sampler == "ddim":
            return _ddim_loop(chain, call_model, x, loop_key, constrain, clip_denoised, eta)
        return _dpm_solver_2m_loop(chain, call_model, x, constrain, clip_denoised)

    return run(rng, labels, cfg_scale, eta)
