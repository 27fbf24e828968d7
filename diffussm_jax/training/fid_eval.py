"""In-training FID: score a small EMA sample every `config.eval.fid_every_steps` steps.

    fid = fid_eval.InTrainingFID.from_config(config, model, diffusion, mesh)  # None when off
    ...
    if fid is not None and fid.due(step):
        writer.write(step, fid(state.ema_params))

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

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from diffussm_jax import data, evaluation
from diffussm_jax.evaluation import inception as inception_lib
from diffussm_jax.training import metrics, sampling

# Offsets from config.seed: the sample noise differs from the training and grid streams.
_NOISE_SEED_OFFSET = 2


class InTrainingFID:
    """Draws and scores a fixed-seed sample; call with EMA params, get {"eval/...": float}."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model,
        diffusion,
        mesh: jax.sharding.Mesh,
        *,
        scorer: str,
    ):
        """Use `from_config`; `scorer` is "inception" or "digits"."""
        eval_config = config.eval
        self.every_steps = int(eval_config.fid_every_steps)
        self.num_samples = int(eval_config.fid_num_samples)
        if self.num_samples < 2:
            raise ValueError(f"config.eval.fid_num_samples={self.num_samples}: need at least 2.")
        devices = mesh.devices.size
        batch_size = eval_config.batch_size or config.global_batch_size
        self.batch_size = -(-batch_size // devices) * devices
        self.mesh = mesh
        self.labels = evaluation.draw_labels(
            self.num_samples, config.data.num_classes, config.seed, "uniform"
        )
        self.key = jax.random.key(config.seed + _NOISE_SEED_OFFSET)
        self.sample_fn = sampling.make_sample_fn(
            model,
            diffusion,
            mesh,
            sampler=eval_config.sampler or config.sampling.sampler,
            steps=eval_config.steps or config.sampling.steps,
            cfg_scale=(
                config.sampling.cfg_scale
                if eval_config.cfg_scale is None
                else eval_config.cfg_scale
            ),
            clip_denoised=sampling.clip_denoised_for(config),
            decoder=sampling.latent_decoder(config),  # latent models: images via the VAE
        )
        self.scorer = scorer
        if scorer == "inception":
            # The preprocessing of ADM's TF graph, as launch.evaluate uses.
            self.extractor = inception_lib.InceptionFeatures.from_file(
                eval_config.inception_path,
                batch_size=min(self.batch_size, 200),
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
    def from_config(
        cls, config: ml_collections.ConfigDict, model, diffusion, mesh
    ) -> InTrainingFID | None:
        """The hook `config.eval` asks for, or None when `fid_every_steps` is 0 (or unset).

        Raises:
          ValueError: in-training FID is on but nothing can score the samples (only one of the
            Inception and reference paths set, or neither for a dataset other than the digits).
        """
        eval_config = config.get("eval")
        if eval_config is None or not eval_config.fid_every_steps:
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
        return cls(config, model, diffusion, mesh, scorer=scorer)

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def sample(self, params) -> np.ndarray:
        """(num_samples, H, W, C) uint8 samples of `params`, the same noise at every call."""
        chunks = []
        for start in range(0, self.num_samples, self.batch_size):
            labels = self.labels[start : start + self.batch_size]
            padded = np.resize(labels, self.batch_size)  # one compiled batch size
            images = sampling.draw(
                self.sample_fn, params, jax.random.fold_in(self.key, start), padded, self.mesh
            )
            chunks.append(metrics.to_uint8(images[: len(labels)]))
        return np.concatenate(chunks)

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
            "in-training FID (%d samples): %s",
            self.num_samples,
            ", ".join(f"{k}={v:.4g}" for k, v in result.items()),
        )
        return result
