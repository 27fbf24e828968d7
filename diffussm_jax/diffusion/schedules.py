"""Noise schedules: the betas of a T-step diffusion, as float64 numpy arrays on the host.

Schedules are computed once in float64 so that the derived quantities (alpha_bar, posterior
coefficients) are exact to float32 precision when they are cast for use on the accelerator.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Linear betas from 1e-4 to 0.02 at T=1000 (DDPM), rescaled for other T.

    The endpoints are multiplied by 1000 / T, as improved-DDPM and DiT do, so that a shorter chain
    destroys the signal about as completely as the 1000-step one (alpha_bar_T stays close to 0).

    Returns:
      betas: (T,) float64.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of improved-DDPM: alpha_bar(s) = cos^2(pi/2 * (s + offset) / (1 + offset)).

    betas are read off consecutive alpha_bar ratios and capped at `max_beta`, because the last ratio
    goes to 0 and a beta of 1 would make the reverse process singular.

    Returns:
      betas: (T,) float64.
    """

    def alpha_bar(s: np.ndarray) -> np.ndarray:
        return np.cos((s + offset) / (1.0 + offset) * math.pi / 2.0) ** 2

    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    ratios = alpha_bar(s[1:]) / alpha_bar(s[:-1])
    return np.minimum(1.0 - ratios, max_beta)


def betas_for_schedule(schedule: str, num_timesteps: int) -> np.ndarray:
    """Betas of a named schedule ("linear" or "cosine"); (T,) float64."""
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")
