"""Export samples of a trained run: restore a checkpoint's EMA weights (the newest, or a given
step such as a milestone) and write an ADM-style .npz.

The .npz holds `arr_0` (N, H, W, C) uint8 (round((x + 1) * 127.5), clipped) and `arr_1` (N,)
int labels; a PNG grid of the first samples is written beside it. Latent models are decoded
through the frozen VAE (`config.vae.path`, or `vae_path`), so `arr_0` always holds images.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from diffussm_jax import console, data, evaluation, files, sampling, training
from diffussm_jax.inference import restore


def sample_to_npz(
    workdir: str,
    output: str,
    *,
    num_samples: int,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    labels: list[int] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    guidance_channels: int | None = None,
    vae_path: str | None = None,
    checkpoint_step: int | None = None,
) -> dict[str, Any]:
    """Draws `num_samples` from the EMA params; labels cycle through `labels` or are uniform.

    Unset sampler / steps / cfg_scale take the run's `config.sampling` values; `vae_path`
    overrides the run's `config.vae.path` (latent models only). `checkpoint_step` picks a
    checkpoint (e.g. a milestone); unset: the newest.
    Returns the paths written ({"npz", "png"}); class-conditional embedded digits add
    "digits_accuracy", the fraction the digits classifier assigns to the requested class.
    """
    workdir = files.resolve(workdir)
    config = restore.load_config(workdir)
    # Before the slow restore: fail fast on a missing VAE or a sampler the process lacks.
    decoder = training.latent_decoder(config, vae_path)
    experiment = training.setup(config, for_training=False)
    sample_fn = experiment.sample_fn(
        decoder,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        guidance_channels=guidance_channels,
    )
    params, step = restore.restore_ema_params(experiment, workdir, checkpoint_step)
    settings = training.sampling_settings(config, sampler=sampler, steps=steps, cfg_scale=cfg_scale)
    num_classes = config.data.num_classes
    rng = np.random.default_rng(seed)
    if num_classes == 0:
        all_labels = np.zeros(num_samples, np.int32)
    elif labels:
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad:
            raise ValueError(f"labels {bad} out of range [0, {num_classes}).")
        all_labels = np.resize(np.asarray(labels, np.int32), num_samples)
    else:
        all_labels = rng.integers(0, num_classes, num_samples).astype(np.int32)

    draws = sampling.BatchedDraw(
        sample_fn,
        experiment.mesh,
        all_labels,
        batch_size=batch_size or config.global_batch_size,
        key=jax.random.key(seed),
    )
    progress = console.Progress(
        num_samples, label="sampled", item_name="img", enabled=jax.process_index() == 0
    )
    images = draws.all(params, progress)
    progress.close()

    output = files.resolve(output)
    # splitext is string-only, so it also splits a gs:// URL.
    paths: dict[str, Any] = {"npz": output, "png": os.path.splitext(output)[0] + ".png"}
    if jax.process_index() == 0:
        meta = dict(
            model=config.model_name,
            step=step,
            process=config.diffusion.process,
            **settings,
            seed=seed,
            vae=None if decoder is None else (vae_path or config.vae.path),
            uint8=evaluation.UINT8_RULE,
        )
        files.save_npz(output, arr_0=images, arr_1=all_labels, meta=np.asarray(json.dumps(meta)))
        shown = images[:100]
        sampling.save_png(
            paths["png"], sampling.image_grid(shown, int(np.ceil(np.sqrt(len(shown)))))
        )
        if config.data.name == data.EmbeddedDigits.name and num_classes > 0:
            quality = evaluation.digits_quality(images, all_labels, data_dir=config.data.data_dir)
            paths["digits_accuracy"] = float(quality["accuracy"])
    return paths
