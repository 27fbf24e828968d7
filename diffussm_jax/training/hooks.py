"""What the training loop does besides training: EMA sample grids, and sample quality scores.

Sample grids (`write_sample_grid`, every `config.sample_every_steps`): one row per class, saved
as `samples/step_<N>.png` and to TensorBoard; the embedded digits are also scored by the digits
classifier.

Sample quality (`SampleQualityHook`, every `config.eval.fid_every_steps`):

    quality = SampleQualityHook.from_config(experiment)       # None when off
    ...
    if quality is not None and quality.due(step):
        writer.write(step, quality(state.ema_params))

Each evaluation draws `config.eval.fid_num_samples` samples with the same labels (uniform, from
`config.seed`) and the same noise every time, so the curve moves with the weights only, and
scores them with one of:

  Inception  (config.eval.inception_path and reference_path set): FID against the reference
             batch's `mu`/`sigma` (eval/fid), sFID when it has `mu_s`/`sigma_s` (eval/sfid), and
             the Inception Score (eval/inception_score), all from `evaluation.inception`.
  digits     (the embedded digits, no Inception): the offline classifier's Frechet distance to
             the real digits (eval/digits_frechet_distance) and the fraction of samples
             classified as the requested class (eval/digits_accuracy).

FID on N samples is biased upwards relative to FID-50K (the covariance estimate is noisier);
compare in-training values only with each other, at one N. Numbers for reports come from
`launch.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from absl import logging

from diffussm_jax import data, evaluation, files, sampling
from diffussm_jax.evaluation import inception as inception_lib
from diffussm_jax.training import experiment as experiment_lib
from diffussm_jax.training import summary


@dataclasses.dataclass(frozen=True)
class GridResult:
    """A sample grid written at `step`; the digits get the classifier's accuracy on it."""

    step: int
    path: str
    size: int
    digits_accuracy: float | None = None


def write_sample_grid(config, workdir, step, sample_fn, params, mesh, writer) -> GridResult:
    """EMA samples, one row per class for conditional models, as `samples/step_<N>.png`.

    Class-conditional digits are scored by the digits classifier (the fraction classified as
    the requested digit, metric `eval/grid_digits_accuracy`) on process 0.
    """
    sampling_config = config.sampling
    if config.data.num_classes > 0:
        labels = sampling.grid_labels(
            config.data.num_classes, sampling_config.num_classes_in_grid, sampling_config.per_class
        )
        rows = len(labels) // sampling_config.per_class
    else:
        labels = np.zeros(sampling_config.num_unconditional, np.int32)
        rows = int(np.sqrt(len(labels)))
    rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
    images = evaluation.to_uint8(sampling.draw(sample_fn, params, rng, labels, mesh))
    grid = sampling.image_grid(images, rows)
    path = files.join(workdir, "samples", f"step_{step:07d}.png")
    accuracy = None
    if jax.process_index() == 0:
        sampling.save_png(path, grid)
        writer.write_image(step, "ema_samples", grid)
        files.write_atomically(
            files.join(workdir, "samples", "latest.json"),
            json.dumps({"step": step, "path": path, "labels": labels.tolist()}),
        )
        scored = ""
        if config.data.name == data.EmbeddedDigits.name and config.data.num_classes > 0:
            quality = evaluation.digits_quality(images, labels, data_dir=config.data.data_dir)
            accuracy = float(quality["accuracy"])
            writer.write(step, {"eval/grid_digits_accuracy": accuracy})
            scored = f", {accuracy:.1%} of {len(labels)} classified as the requested digit"
        if step < config.num_train_steps:  # the last grid is in the closing summary
            logging.info("step %d: sample grid %s%s", step, summary.shown_path(path), scored)
    return GridResult(step, path, len(labels), accuracy)


# Offsets from config.seed: the sample noise differs from the training and grid streams.
_NOISE_SEED_OFFSET = 2


class SampleQualityHook:
    """Draws and scores a fixed-seed sample; call with EMA params, get {"eval/...": float}.

    Scores with Inception (FID, sFID, IS) or, for the embedded digits, the digits classifier.
    """

    def __init__(self, experiment: experiment_lib.Experiment, *, scorer: str):
        """Use `from_config`; `scorer` is "inception" or "digits"."""
        config = experiment.config
        eval_config = config.eval
        self.every_steps = int(eval_config.fid_every_steps)
        self.num_samples = int(eval_config.fid_num_samples)
        if self.num_samples < 2:
            raise ValueError(f"config.eval.fid_num_samples={self.num_samples}: need at least 2.")
        self.labels = evaluation.draw_labels(
            self.num_samples, config.data.num_classes, config.seed, "uniform"
        )
        sample_fn = experiment.sample_fn(
            decoder=experiment_lib.latent_decoder(config),  # latent models: images via the VAE
            sampler=eval_config.sampler,
            steps=eval_config.steps,
            cfg_scale=eval_config.cfg_scale,
        )
        self.draws = sampling.BatchedDraw(
            sample_fn,
            experiment.mesh,
            self.labels,
            batch_size=eval_config.batch_size or config.global_batch_size,
            key=jax.random.key(config.seed + _NOISE_SEED_OFFSET),
        )
        self.scorer = scorer
        if scorer == "inception":
            # The preprocessing of ADM's TF graph, as launch.evaluate uses.
            self.extractor = inception_lib.InceptionFeatures.from_file(
                eval_config.inception_path,
                batch_size=min(self.draws.batch_size, 200),
                preprocessing="tf_graph",
            )
            reference = evaluation.load_reference_batch(
                eval_config.reference_path, load_images=False
            )
            if reference.pool_statistics is None:
                raise ValueError(
                    f"{eval_config.reference_path} has no mu/sigma: in-training FID needs a "
                    "reference batch with precomputed statistics (ADM's reference batches have)."
                )
            self.reference = reference
        elif scorer == "digits":
            self.digits = evaluation.load_or_train_classifier(data_dir=config.data.data_dir)
        else:
            raise ValueError(f"Unknown scorer {scorer!r}.")

    @classmethod
    def from_config(cls, experiment: experiment_lib.Experiment) -> SampleQualityHook | None:
        """The hook `config.eval` asks for, or None when `fid_every_steps` is 0 (or unset).

        Raises:
          ValueError: in-training FID is on but nothing can score the samples (only one of the
            Inception and reference paths set, or neither for a dataset other than the digits).
        """
        config = experiment.config
        eval_config = config.eval
        if not eval_config.fid_every_steps:
            return None
        inception_path, reference_path = eval_config.inception_path, eval_config.reference_path
        if inception_path and reference_path:
            scorer = "inception"
        elif inception_path or reference_path:
            raise ValueError(
                "config.eval.inception_path and config.eval.reference_path must be set together "
                f"(got {inception_path!r}, {reference_path!r})."
            )
        elif config.data.name == data.EmbeddedDigits.name:
            scorer = "digits"
        else:
            raise ValueError(
                f"config.eval.fid_every_steps={eval_config.fid_every_steps} but nothing can score "
                f"{config.data.name!r} samples: set config.eval.inception_path (converted with "
                "launch/convert_inception.py) and config.eval.reference_path (an ADM reference "
                "batch), or set config.eval.fid_every_steps=0."
            )
        return cls(experiment, scorer=scorer)

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def sample(self, params) -> np.ndarray:
        """(num_samples, H, W, C) uint8 samples of `params`, the same noise at every call."""
        return self.draws.all(params)

    def __call__(self, params) -> dict[str, float]:
        """Samples with `params` (the EMA weights) and scores them; {} on processes other than 0."""
        begin = time.perf_counter()
        images = self.sample(params)  # every process takes part in the sharded sampling
        if jax.process_index() != 0:
            return {}
        if self.scorer == "inception":
            activations = self.extractor(images)
            result = {
                "eval/fid": evaluation.fid(activations["pool"], self.reference.pool_statistics)
            }
            if self.reference.spatial_statistics is not None:
                result["eval/sfid"] = evaluation.sfid(
                    activations["spatial"], self.reference.spatial_statistics
                )
            if "adm_logits" in activations:
                result["eval/inception_score"] = evaluation.inception_score(
                    activations["adm_logits"], from_logits=True
                )
        else:
            quality = self.digits.quality(images, self.labels)
            result = {
                "eval/digits_frechet_distance": quality["frechet_distance"],
                "eval/digits_accuracy": quality["accuracy"],
            }
        result["eval/seconds"] = time.perf_counter() - begin
        logging.info(
            "sample quality (%d samples): %s",
            self.num_samples,
            ", ".join(f"{k}={v:.4g}" for k, v in result.items()),
        )
        return result
