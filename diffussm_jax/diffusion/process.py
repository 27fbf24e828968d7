"""The process objects: what a model is trained to reverse, as static configuration.

`Diffusion` is the Gaussian diffusion of DDPM/DiT: a frozen dataclass of float64 numpy schedule
arrays and Python scalars. It is not a pytree: close over it (or pass it as a static argument; it
hashes by identity) and its arrays become constants of the jitted program. Functions in `gaussian`,
`losses` and `samplers` cast the arrays to float32 (or to float64 under `jax.enable_x64`) where
they are used.

`Flow` is the linear-interpolant flow matching of SiT (x_t = (1 - t) x_0 + t eps, t in [0, 1]);
it holds only the training-time distribution of t, and its math lives in `flow`.

`Process` (either one) is what `training_losses`, `sample_timesteps` and `sample` accept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffussm_jax.diffusion import respacing, schedules

LOSSES = ("hybrid", "mse")
FIXED_VARIANCES = ("large", "small")
PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")
T_SAMPLINGS = ("uniform", "logit_normal")


# eq=False: numpy fields make value equality ambiguous; identity hashing lets the object be a static
# jit argument.
@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
    """A (possibly respaced) Gaussian diffusion with N steps.

    Arrays are (N,) float64 unless noted; index k is the k-th step of this chain, which is original
    step `timestep_map[k]` of the chain the model was trained on.

    Attributes:
      betas: beta_k.
      alphas_cumprod: alpha_bar_k = prod_{j<=k} (1 - beta_j).
      alphas_cumprod_prev: alpha_bar_{k-1}, with 1 before the first step.
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: scales of x_0 and noise in q(x_k | x_0).
      sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod: x_0 = a * x_k - b * eps.
      posterior_variance: variance of q(x_{k-1} | x_k, x_0) (0 at k = 0).
      posterior_log_variance_clipped: its log, with the k = 0 entry replaced by the k = 1 entry
        because the true value is log 0.
      posterior_mean_coef1, posterior_mean_coef2: posterior mean = coef1 * x_0 + coef2 * x_k.
      timestep_map: (N,) int32, original step of each index (identity unless respaced).
      original_num_timesteps: length of the chain the model was trained on.
      learn_sigma: model outputs 2C channels (eps, v) and the variance is "learned range".
      fixed_variance: "large" (beta_k) or "small" (posterior variance) when sigma is not learned.
      loss: "hybrid" (MSE on the mean output + VLB on the variance) or "mse" (MSE only).
      schedule: name of the beta schedule of the original chain.
      prediction: what the first C output channels are: "eps" (the noise, DDPM/DiT), "v"
        (sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, Salimans & Ho 2022) or "x0" (the data).
      loss_weighting: per-example weight of the MSE term: "none" or "min_snr" (Hang et al. 2023,
        see `losses.mse_weights`).
      min_snr_gamma: gamma of "min_snr", the SNR above which the weight stops growing.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray
    original_num_timesteps: int
    learn_sigma: bool
    fixed_variance: str
    loss: str
    schedule: str
    prediction: str = "eps"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0

    @property
    def num_timesteps(self) -> int:
        """N, the number of steps of this (possibly respaced) chain."""
        return int(self.betas.shape[0])


def from_betas(
    betas: np.ndarray,
    *,
    timestep_map: np.ndarray | None = None,
    original_num_timesteps: int | None = None,
    learn_sigma: bool = True,
    fixed_variance: str = "large",
    loss: str = "hybrid",
    schedule: str = "custom",
    prediction: str = "eps",
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> Diffusion:
    """Builds a `Diffusion` from betas (N,), deriving every other array in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array with entries in (0, 1]")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if fixed_variance not in FIXED_VARIANCES:
        raise ValueError(f"unknown fixed_variance {fixed_variance!r}; expected {FIXED_VARIANCES}")
    if loss == "hybrid" and not learn_sigma:
        raise ValueError("loss='hybrid' trains the learned variance; it needs learn_sigma=True")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"unknown loss_weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}"
        )
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive (5 in Hang et al.), got {min_snr_gamma}")
    num_steps = betas.shape[0]
    if timestep_map is None:
        timestep_map = np.arange(num_steps)
    if original_num_timesteps is None:
        original_num_timesteps = num_steps

    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is exactly 0 at the first step; the clipped log borrows the next entry
    # so log-variances stay finite (they are interpolated with log beta by the learned range).
    first = posterior_variance[1] if num_steps > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.concatenate([[first], posterior_variance[1:]]))
    return Diffusion(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
        * np.sqrt(1.0 - betas)
        / (1.0 - alphas_cumprod),
        timestep_map=np.asarray(timestep_map, dtype=np.int32),
        original_num_timesteps=int(original_num_timesteps),
        learn_sigma=bool(learn_sigma),
        fixed_variance=fixed_variance,
        loss=loss,
        schedule=schedule,
        prediction=prediction,
        loss_weighting=loss_weighting,
        min_snr_gamma=float(min_snr_gamma),
    )


def respace(diffusion: Diffusion, spec: str | int) -> Diffusion:
    """The chain that visits only the steps of `diffusion` chosen by `spec` (see `space_timesteps`).

    Respacing an already respaced diffusion composes the maps, so `timestep_map` always points at
    the original chain the model was trained on.
    """
    kept = respacing.space_timesteps(diffusion.num_timesteps, spec, diffusion.alphas_cumprod)
    return from_betas(
        respacing.respace_betas(diffusion.alphas_cumprod, kept),
        timestep_map=diffusion.timestep_map[kept],
        original_num_timesteps=diffusion.original_num_timesteps,
        learn_sigma=diffusion.learn_sigma,
        fixed_variance=diffusion.fixed_variance,
        loss=diffusion.loss,
        schedule=diffusion.schedule,
        prediction=diffusion.prediction,
        loss_weighting=diffusion.loss_weighting,
        min_snr_gamma=diffusion.min_snr_gamma,
    )


def create(
    num_timesteps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    loss: str | None = None,
    timestep_respacing: str | int | None = None,
    fixed_variance: str = "large",
    prediction: str = "eps",
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> Diffusion:
    """The DiT/DiffuSSM diffusion: T steps of `schedule`, optionally respaced.

    Args:
      num_timesteps: T of the training chain (1000 in the paper).
      schedule: "linear" (paper) or "cosine".
      learn_sigma: model predicts (eps, v) with 2C channels, variance by "learned range" (paper).
      loss: "hybrid" (paper; eps-MSE plus the VLB on the variance channels) or "mse". Defaults to
        "hybrid" when sigma is learned and "mse" otherwise.
      timestep_respacing: None for the full chain, or a spec such as "250", "ddim50", "10,15,20".
      fixed_variance: variance when sigma is not learned: "large" (beta_t, DiT's default) or
        "small" (the true posterior variance).
      prediction: the network's mean output: "eps" (paper), "v" or "x0". Every sampler and the
        learned-variance channels work with each.
      loss_weighting: "none" (paper) or "min_snr" (min-SNR-gamma weighting of the MSE term).
      min_snr_gamma: gamma of "min_snr" (5 in Hang et al. 2023).

    Returns:
      A `Diffusion`; close over it inside jit.
    """
    if loss is None:
        loss = "hybrid" if learn_sigma else "mse"
    diffusion = from_betas(
        schedules.betas_for_schedule(schedule, num_timesteps),
        learn_sigma=learn_sigma,
        fixed_variance=fixed_variance,
        loss=loss,
        schedule=schedule,
        prediction=prediction,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
    )
    if timestep_respacing is not None and str(timestep_respacing) != "":
        diffusion = respace(diffusion, timestep_respacing)
    return diffusion


@dataclasses.dataclass(frozen=True)
class Flow:
    """Linear-interpolant flow matching: x_t = (1 - t) x_0 + t eps, t in [0, 1], t = 0 is data.

    The network predicts the velocity v = eps - x_0 from (x_t, t) with t a float in [0, 1]; see
    `flow` for the loss and the ODE samplers. Value-hashable, so it can be a static jit argument.

    Attributes:
      t_sampling: training distribution of t: "uniform" on [0, 1], or "logit_normal"
        (t = sigmoid(logit_mean + logit_std * z), z ~ N(0, 1); SD3, Esser et al. 2024), which
        spends more of the training on the middle of the path.
      logit_mean, logit_std: parameters of "logit_normal" (SD3 uses 0 and 1).
    """

    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


def create_flow(
    t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0
) -> Flow:
    """The linear-interpolant flow process (SiT); see `Flow`."""
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"unknown t_sampling {t_sampling!r}; expected one of {T_SAMPLINGS}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be positive, got {logit_std}")
    return Flow(t_sampling=t_sampling, logit_mean=float(logit_mean), logit_std=float(logit_std))


Process = Diffusion | Flow
