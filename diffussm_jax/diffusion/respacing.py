"""Timestep respacing: run a T-step diffusion on a subset of its steps (improved-DDPM section 4).

A respaced chain keeps the marginals q(x_t | x_0) of the kept steps exactly (same alpha_bar) and
recomputes the betas between consecutive kept steps, so a model trained on the full chain can be
sampled with fewer steps. The model itself always sees t on the original scale; the diffusion
object keeps the map from respaced index to original step (`Diffusion.timestep_map`).
"""

from __future__ import annotations

import numpy as np


def space_timesteps(
    num_timesteps: int, spec: str | int, alphas_cumprod: np.ndarray | None = None
) -> np.ndarray:
    """Which of the original steps 0..T-1 to keep.

    Args:
      num_timesteps: T, the length of the chain being respaced.
      spec: one of
        - "ddimN": N steps with a constant integer stride s (0, s, 2s, ...), the DDIM paper's
          convention; the smallest stride that yields exactly N steps is used.
        - "N" or N: N steps spread evenly over [0, T-1], both ends included (the paper's "250").
        - "N1,N2,...": the chain is cut into len(list) near-equal sections and section k gets N_k
          evenly spread steps (improved-DDPM's space_timesteps), e.g. "10,15,20".
        - "logsnrN": N steps whose log signal-to-noise ratios are as close as possible to evenly
          spaced between those of steps T-1 and 0 (DPM-Solver's "logSNR" grid); needs
          `alphas_cumprod`.
      alphas_cumprod: (T,) alpha_bar of the chain, only for "logsnrN".

    Returns:
      kept: (N,) int64, sorted ascending, unique.
    """
    spec = str(spec).strip()
    if spec.startswith("logsnr"):
        if alphas_cumprod is None:
            raise ValueError("a 'logsnrN' spacing needs alphas_cumprod")
        return _logsnr_uniform_steps(np.asarray(alphas_cumprod), int(spec[len("logsnr") :]))
    if spec.startswith("ddim"):
        count = int(spec[len("ddim") :])
        for stride in range(1, num_timesteps + 1):
            # len(range(0, T, stride)) without building the range.
            if -(-num_timesteps // stride) == count:
                return np.arange(0, num_timesteps, stride, dtype=np.int64)
        raise ValueError(
            f"cannot take exactly {count} steps with a constant stride from {num_timesteps}; "
            f"use an evenly spread spec such as '{count}' instead"
        )

    counts = [int(c) for c in spec.split(",")]
    num_sections = len(counts)
    # Sections differ in length by at most one: the first T % n sections get the extra step.
    base_size, extra = divmod(num_timesteps, num_sections)
    kept: list[int] = []
    start = 0
    for section, count in enumerate(counts):
        size = base_size + (1 if section < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        if count < 1:
            raise ValueError(f"each section needs at least one step, got {spec!r}")
        # Evenly spread including both ends of the section; round() as improved-DDPM does, so the
        # paper's "250" keeps the same steps as the released DiT/ADM code.
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.extend(start + round(k * stride) for k in range(count))
        start += size
    return np.asarray(sorted(set(kept)), dtype=np.int64)


def _logsnr_uniform_steps(alphas_cumprod: np.ndarray, count: int) -> np.ndarray:
    num_timesteps = alphas_cumprod.shape[0]
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} steps from {num_timesteps}")
    log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)
    targets = np.linspace(log_snr[-1], log_snr[0], count)  # noisiest first
    kept = []
    highest_allowed = num_timesteps - 1
    for k, target in enumerate(targets):
        # Near t = 0 the grid is finer than the integer steps; nearest-step rounding would repeat
        # steps, so each pick leaves room below it for the count - 1 - k picks still to come.
        lowest_allowed = count - 1 - k
        candidates = np.arange(lowest_allowed, highest_allowed + 1)
        step = int(candidates[np.argmin(np.abs(log_snr[candidates] - target))])
        kept.append(step)
        highest_allowed = step - 1
    return np.asarray(kept[::-1], dtype=np.int64)


def respace_betas(alphas_cumprod: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Betas of the chain that visits only `kept` steps, with alpha_bar unchanged there.

    beta'_k = 1 - alpha_bar[kept[k]] / alpha_bar[kept[k-1]], with alpha_bar before step 0 equal to
    1, so prod_{j<=k} (1 - beta'_j) = alpha_bar[kept[k]] exactly.

    Args:
      alphas_cumprod: (T,) float64, of the chain being respaced.
      kept: (N,) int, sorted ascending.

    Returns:
      betas: (N,) float64.
    """
    kept_alphas_cumprod = alphas_cumprod[kept]
    previous = np.concatenate([[1.0], kept_alphas_cumprod[:-1]])
    return 1.0 - kept_alphas_cumprod / previous
