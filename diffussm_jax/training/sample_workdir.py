"""Sample a trained run: restore a checkpoint of a workdir (the newest, or a given step such as a
milestone) and write an ADM-style .npz.

The .npz holds `arr_0` (N, H, W, C) uint8 (round((x + 1) * 127.5), clipped) and `arr_1` (N,)
int labels; a PNG grid of the first samples is written beside it. Latent models are decoded
through the frozen VAE (`config.vae.path`, or `vae_path`), so `arr_0` always holds images.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from diffussm_jax import console, data, evaluation, files
from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax.training import checkpoint, metrics, sampling, sharding, train_state, trainer


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (`<workdir>/config.json`), in the current layout."""
    checkpoint.check_location(workdir)  # before any read: s3:// never holds a run's checkpoints
    path = files.join(workdir, "config.json")
    if not files.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by launch.train."
        )
    with files.open(path) as f:
        return train_state.upgrade_saved_config(ml_collections.ConfigDict(json.load(f)))


def restore_ema_params(
    workdir: str, config: ml_collections.ConfigDict, mesh, checkpoint_step: int | None = None
):
    """(model, EMA params, step) from checkpoint `checkpoint_step` (unset: the newest)."""
    model = train_state.build_model(config)
    tx = train_state.create_optimizer(config)
    abstract, _ = train_state.abstract_train_state(config, model, tx, mesh)
    checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        state, step = checkpointer.restore(abstract, step=checkpoint_step)
    finally:
        checkpointer.close()
    return model, state.ema_params, step


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
    config = load_config(workdir)
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    # Before the slow restore: fail fast on a missing VAE or a sampler the process lacks.
    decoder = sampling.latent_decoder(config, vae_path)
    diffusion = trainer.create_diffusion(config)
    sampler = sampler or config.sampling.sampler
    diffusion_lib.check_sampler(diffusion, sampler)
    model, params, step = restore_ema_params(workdir, config, mesh, checkpoint_step)
    steps = steps or config.sampling.steps
    cfg_scale = config.sampling.cfg_scale if cfg_scale is None else cfg_scale
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

    sample_fn = sampling.make_sample_fn(
        model,
        diffusion,
        mesh,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        guidance_channels=guidance_channels,
        clip_denoised=sampling.clip_denoised_for(config),
        decoder=decoder,
    )
    batch_size = batch_size or config.global_batch_size
    key = jax.random.key(seed)
    chunks = []
    progress = console.Progress(
        num_samples, label="sampled", item_name="img", enabled=jax.process_index() == 0
    )
    for start in range(0, num_samples, batch_size):
        batch_labels = all_labels[start : start + batch_size]
        images = sampling.draw(
            sample_fn, params, jax.random.fold_in(key, start), batch_labels, mesh
        )
        chunks.append(metrics.to_uint8(images))
        progress.report(min(start + batch_size, num_samples))
    progress.close()
    images = np.concatenate(chunks)

    output = files.resolve(output)
    # splitext is string-only, so it also splits a gs:// URL.
    paths: dict[str, Any] = {"npz": output, "png": os.path.splitext(output)[0] + ".png"}
    if jax.process_index() == 0:
        meta = dict(
            model=config.model_name,
            step=step,
            process=train_state.process_name(config),
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            vae=None if decoder is None else (vae_path or config.vae.path),
            uint8="round((x + 1) * 127.5) clipped to [0, 255]",
        )
        files.save_npz(output, arr_0=images, arr_1=all_labels, meta=np.asarray(json.dumps(meta)))
        shown = images[:100]
        metrics.save_png(paths["png"], metrics.image_grid(shown, int(np.ceil(np.sqrt(len(shown))))))
        if config.data.name == data.EmbeddedDigits.name and num_classes > 0:
            quality = evaluation.digits_quality(images, all_labels, data_dir=config.data.data_dir)
            paths["digits_accuracy"] = float(quality["accuracy"])
    return paths
