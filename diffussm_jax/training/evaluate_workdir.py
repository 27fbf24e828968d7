"""Evaluate a trained run: sample with the EMA weights, write the .npz, score what can be scored.

For the embedded digits the samples are scored offline by the project's digit classifier
(`evaluation.digits_quality`): accuracy against the requested classes and a Frechet distance in
its feature space. For other datasets the .npz is what ADM's evaluator reads (see
`diffussm_jax.evaluation` for the exact protocol).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging

from diffussm_jax import data, evaluation
from diffussm_jax.training import sample_workdir


def evaluate(
    workdir: str,
    *,
    num_samples: int,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    output_dir: str | None = None,
) -> dict:
    """Samples `num_samples` with labels cycling over the classes, writes and scores them.

    Returns the metrics dict (also written as JSON beside the .npz).
    """
    config = sample_workdir.load_config(workdir)
    num_classes = max(config.data.num_classes, 1)
    labels = list(range(num_classes)) if config.data.num_classes else None
    output_dir = output_dir or os.path.join(workdir, "eval")
    tag = f"{sampler or config.sampling.sampler}-{steps or config.sampling.steps}steps-cfg" + (
        f"{config.sampling.cfg_scale if cfg_scale is None else cfg_scale}"
    )
    paths = sample_workdir.sample_to_npz(
        workdir,
        os.path.join(output_dir, f"samples_{num_samples}_{tag}.npz"),
        num_samples=num_samples,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        labels=labels,
        seed=seed,
    )
    with np.load(paths["npz"], allow_pickle=False) as f:
        images, requested, meta = f["arr_0"], f["arr_1"], json.loads(str(f["meta"]))
    result: dict = {"samples": paths["npz"], "grid": paths["png"], **meta}
    if config.data.name == data.EmbeddedDigits.name:
        quality = evaluation.digits_quality(images, requested, data_dir=config.data.data_dir)
        quality["per_class_accuracy"] = [float(x) for x in quality["per_class_accuracy"]]
        result.update(quality)
    else:
        logging.info(
            "No offline scorer for %s: run ADM's evaluator on %s", config.data.name, paths["npz"]
        )
    with open(os.path.splitext(paths["npz"])[0] + ".json", "w") as f:
        json.dump(result, f, indent=2)
    return result
