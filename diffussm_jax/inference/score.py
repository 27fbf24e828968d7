"""Evaluate a trained run by the FID protocol: sample, write ADM's .npz, score what can be scored.

    evaluate(workdir, num_samples=50_000, sampler="ddpm", steps=250, cfg_scale=1.5,
             inception_path="inception_fid.npz",
             reference_path="VIRTUAL_imagenet256_labeled.npz")

1. The EMA weights of the newest checkpoint (or of checkpoint `step`, e.g. a milestone) draw
   `num_samples` images in batches of `batch_size`, each batch one jitted call sharded over
   every device of every process. Labels are drawn uniformly from the classes by a seeded numpy
   generator before sampling starts (`labels="balanced"` cycles through the classes instead);
   batch b uses the key fold_in(key(seed), first index of b), so the result does not depend on
   which batches ran in which session.
2. Each finished batch is converted to uint8 (`evaluation.to_uint8`) and written atomically to
   `<name>.shards/batch_<b>.npz`. A restarted evaluation with the same settings skips the
   batches already on disk (a manifest in the shard directory records the settings; different
   settings in the same directory are an error, not a silent mix).
3. The shards are streamed into `<name>.npz`: `arr_0` uint8 (N, H, W, C), `arr_1` labels, the
   file ADM's `evaluator.py` reads. `<name>` records model, step, N, sampler, steps, cfg scale
   and seed; `<name>.json` holds the same metadata (and the uint8 conversion) plus the metrics.
4. Scores: the embedded digits get the offline classifier metrics (`evaluation.digits_quality`);
   given converted Inception weights and an ADM reference batch, all five ADM metrics come from
   this package's Flax Inception (`evaluation.inception`), whose preprocessing is pytorch-fid's;
   for numbers comparable with papers run ADM's evaluator on `<name>.npz` (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import ml_collections
import numpy as np
from absl import logging

from diffussm_jax import console, data, evaluation, files, parallel, sampling, training
from diffussm_jax.evaluation import inception as inception_lib
from diffussm_jax.inference import restore
from diffussm_jax.training import summary

MANIFEST = "manifest.json"
ADM_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Everything that decides the sample file's content (recorded in its manifest)."""

    model: str
    step: int
    num_samples: int
    sampler: str
    steps: int | None
    cfg_scale: float | None
    seed: int
    batch_size: int
    labels: str
    guidance_channels: int | None
    vae: str | None
    image_shape: tuple[int, int, int]

    def name(self) -> str:
        model = re.sub(r"[^A-Za-z0-9.+-]+", "-", self.model)
        cfg = "none" if self.cfg_scale in (None, 1.0) else f"{self.cfg_scale:g}"
        return (
            f"samples_{model}_step{self.step}_{self.num_samples}x"
            f"{'x'.join(map(str, self.image_shape))}_{self.sampler}{self.steps}_cfg{cfg}"
            f"_seed{self.seed}"
        )


def _prepare_shard_dir(shard_dir: str, settings: SampleSettings) -> None:
    manifest = dataclasses.asdict(settings)
    manifest["image_shape"] = list(settings.image_shape)
    path = files.join(shard_dir, MANIFEST)
    if files.exists(path):
        with files.open(path) as f:
            existing = json.load(f)
        if existing != manifest:
            changed = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise ValueError(
                f"{shard_dir} holds batches drawn with other settings ({changed}: "
                f"{[existing.get(k) for k in changed]} vs {[manifest[k] for k in changed]}); "
                "delete it or pass another --output_dir."
            )
        return
    if jax.process_index() == 0:
        files.write_atomically(path, json.dumps(manifest, indent=2))


def _read_shard(path: str, labels: np.ndarray, image_shape) -> np.ndarray | None:
    """The shard's images if it is complete and matches `labels`; None if absent or bad."""
    if not files.exists(path):
        return None
    try:
        shard = files.load_npz(path)
        images, shard_labels = shard["images"], shard["labels"]
    except (OSError, ValueError, KeyError) as error:
        logging.warning("Shard %s unreadable (%s); drawing it again.", path, error)
        return None
    if images.shape != (len(labels), *image_shape) or not np.array_equal(shard_labels, labels):
        logging.warning("Shard %s does not match this evaluation; drawing it again.", path)
        return None
    return images


def sample_shards(
    workdir: str,
    config: ml_collections.ConfigDict,
    output_dir: str,
    *,
    num_samples: int,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    labels: str = "uniform",
    guidance_channels: int | None = None,
    vae_path: str | None = None,
    checkpoint_step: int | None = None,
) -> tuple[SampleSettings, list[str], np.ndarray]:
    """Draws the samples batch by batch into shard files, skipping finished batches.

    `config` is the run's (`restore.load_config(workdir)`).

    Latent models are decoded through the VAE (`vae_path`, default `config.vae.path`), so the
    shards always hold images. `step`: the checkpoint (default: the newest).

    Returns:
      (settings, shard paths in order, labels (num_samples,)).
    """
    decoder = training.latent_decoder(config, vae_path)  # before the slow restore: fail fast
    experiment = training.setup(config, for_training=False)
    params, step = restore.restore_ema_params(experiment, workdir, checkpoint_step)
    if decoder is None:
        image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    else:
        side = config.data.image_size * decoder.model.config.downsample_factor
        image_shape = (side, side, decoder.model.config.out_channels)
    sampling_settings = training.sampling_settings(
        config, sampler=sampler, steps=steps, cfg_scale=cfg_scale
    )
    all_labels = evaluation.draw_labels(num_samples, config.data.num_classes, seed, labels)
    sample_fn = experiment.sample_fn(
        decoder, guidance_channels=guidance_channels, **sampling_settings
    )
    draws = sampling.BatchedDraw(
        sample_fn,
        experiment.mesh,
        all_labels,
        batch_size=batch_size or config.global_batch_size,
        key=jax.random.key(seed),
    )
    settings = SampleSettings(
        model=config.model_name,
        step=int(step),
        num_samples=num_samples,
        **sampling_settings,
        seed=seed,
        batch_size=draws.batch_size,
        labels=labels,
        guidance_channels=guidance_channels,
        vae=None if decoder is None else (vae_path or config.vae.path),
        image_shape=image_shape,
    )
    shard_dir = files.join(output_dir, settings.name() + ".shards")
    _prepare_shard_dir(shard_dir, settings)

    paths, drawn = [], 0
    progress = console.Progress(
        num_samples, label="sampled", item_name="img", enabled=jax.process_index() == 0
    )
    for index in range(len(draws)):
        batch_labels = draws.labels_of(index)
        path = files.join(shard_dir, f"batch_{index:06d}.npz")
        paths.append(path)
        if parallel.agree_with_first(_read_shard(path, batch_labels, image_shape) is not None):
            continue
        images = draws.draw(params, index)
        if jax.process_index() == 0:
            files.save_npz(path, images=images, labels=batch_labels)
        drawn += 1
        progress.report(draws.starts[index] + len(batch_labels))
    progress.close()
    if drawn < len(paths):
        logging.info(
            "%d of %d batches were already drawn, in %s", len(paths) - drawn, len(paths), shard_dir
        )
    return settings, paths, all_labels


def _iterate_shards(paths: list[str]):
    for path in paths:
        yield files.load_npz(path)["images"]


def reference_activations(
    extractor: inception_lib.InceptionFeatures, reference_path: str, cache: str
) -> tuple[evaluation.ReferenceBatch, dict[str, np.ndarray] | None]:
    """The reference batch and the Inception activations of its images, cached in `cache`.

    Returns (batch without images, activations or None when the file holds no images).
    """
    reference = evaluation.load_reference_batch(reference_path, load_images=False)
    with files.open(reference_path, "rb") as file, np.load(file, allow_pickle=False) as npz:
        has_images = "arr_0" in npz.files
    if not has_images:
        return reference, None
    if files.exists(cache):
        return reference, files.load_npz(cache)
    logging.info("Computing Inception activations of %s", reference_path)
    images = evaluation.load_reference_batch(reference_path).images
    activations = extractor(images)
    files.save_npz(cache, **activations)
    return reference, activations


def inception_metrics(
    shard_paths: list[str],
    inception_path: str,
    reference_path: str,
    cache_dir: str,
    preprocessing: str = "tf_graph",
) -> dict[str, float]:
    """ADM's five metrics (FID, sFID, IS, precision, recall) from the Flax Inception.

    Precision and recall need the reference images (`arr_0`); without them only FID, sFID and
    IS are returned. `preprocessing`: see `inception.preprocess` ("tf_graph" is ADM's graph).
    """
    shard_size = len(files.load_npz(shard_paths[0])["labels"])
    # Inception batches of at most 200 images (2 GB of activations), fewer for small samples.
    extractor = inception_lib.InceptionFeatures.from_file(
        inception_path, batch_size=min(200, shard_size), preprocessing=preprocessing
    )
    samples = extractor(_iterate_shards(shard_paths))
    # The cache name identifies both files (name and size), so other weights or another
    # reference batch never reuse stale activations.
    tag = ".".join(
        f"{files.basename(path)}-{files.size(path)}" for path in (reference_path, inception_path)
    )
    cache = files.join(cache_dir, f"reference_activations.{tag}.{preprocessing}.npz")
    reference, reference_acts = reference_activations(extractor, reference_path, cache)
    if "adm_logits" not in samples:
        raise ValueError(
            f"{inception_path} has no classifier (fc) weights, so no Inception Score: convert "
            f"{inception_lib.FID_WEIGHTS_FILENAME} itself rather than a feature-extractor dict."
        )
    if reference_acts is None:
        if reference.pool_statistics is None or reference.spatial_statistics is None:
            raise ValueError(f"{reference_path} has neither images nor mu/sigma and mu_s/sigma_s.")
        return {
            "inception_score": evaluation.inception_score(samples["adm_logits"], from_logits=True),
            "fid": evaluation.fid(samples["pool"], reference.pool_statistics),
            "sfid": evaluation.sfid(samples["spatial"], reference.spatial_statistics),
        }
    return evaluation.adm_metrics(
        sample_pool=samples["pool"],
        sample_spatial=samples["spatial"],
        sample_predictions=samples["adm_logits"],
        from_logits=True,
        reference_pool=reference_acts["pool"],
        reference_spatial=reference_acts["spatial"],
        reference_batch=reference,
    )


def preview_grid(shard_paths: list[str], labels: str, num_classes: int) -> np.ndarray:
    """The first 100 samples as a grid; balanced labels of at most 20 classes put class k in
    column k (labels cycle through the classes), otherwise the grid is about square."""
    first = []
    for shard in _iterate_shards(shard_paths):
        first.append(shard[: 100 - sum(len(x) for x in first)])
        if sum(len(x) for x in first) >= 100:
            break
    first = np.concatenate(first)
    if labels == "balanced" and 0 < num_classes <= 20:
        rows = -(-len(first) // num_classes)
    else:
        rows = int(np.ceil(np.sqrt(len(first))))
    return sampling.image_grid(first, rows)


def evaluate(
    workdir: str,
    *,
    num_samples: int,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    labels: str = "uniform",
    guidance_channels: int | None = None,
    vae_path: str | None = None,
    inception_path: str | None = None,
    reference_path: str | None = None,
    inception_preprocessing: str = "tf_graph",
    output_dir: str | None = None,
    checkpoint_step: int | None = None,
) -> dict:
    """Samples (resumably), writes `<name>.npz` + `<name>.json` + a PNG grid, and scores.

    Args:
      workdir: a directory written by launch.train.
      num_samples: N (50,000 for FID-50K).
      sampler, steps, cfg_scale: unset: the run's `config.sampling` values.
      seed: labels and noise.
      batch_size: images per sampling call (unset: the run's global batch size).
      labels: "uniform" (protocol) or "balanced" (cycle through the classes).
      guidance_channels: guide only the first C channels (DiT's variant); unset: all.
      vae_path: the VAE that decodes a latent model's samples; unset: `config.vae.path`.
      inception_path, reference_path: converted Inception weights and an ADM reference batch;
        both or neither.
      inception_preprocessing: "tf_graph" (ADM's graph: TF1 resize, (x - 128) / 128) or
        "pytorch_fid"; see `inception.preprocess`.
      output_dir: default `<workdir>/eval`.
      checkpoint_step: the checkpoint to sample (e.g. a milestone); unset: the newest.

    Returns:
      The metadata and metrics, as written to `<name>.json`.
    """
    if (inception_path is None) != (reference_path is None):
        raise ValueError("Pass both --inception and --reference (or neither).")
    for path in (inception_path, reference_path):
        if path is not None and not files.isfile(path):
            raise FileNotFoundError(f"{path} not found (see docs/evaluation.md).")
    workdir = files.resolve(workdir)
    output_dir = files.resolve(output_dir or files.join(workdir, "eval"))
    config = restore.load_config(workdir)
    settings, shard_paths, all_labels = sample_shards(
        workdir,
        config,
        output_dir,
        num_samples=num_samples,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        batch_size=batch_size,
        labels=labels,
        guidance_channels=guidance_channels,
        vae_path=vae_path,
        checkpoint_step=checkpoint_step,
    )
    name = settings.name()
    npz_path = files.join(output_dir, name + ".npz")
    png_path = files.join(output_dir, name + ".png")
    result: dict = {
        "samples": npz_path,
        "grid": png_path,
        **dataclasses.asdict(settings),
        "uint8": evaluation.UINT8_RULE,
    }
    if jax.process_index() != 0:
        return result  # process 0 holds the shards (sampling needed every process; this not)
    evaluation.save_sample_batch_streamed(
        npz_path, _iterate_shards(shard_paths), (num_samples, *settings.image_shape), all_labels
    )
    sampling.save_png(png_path, preview_grid(shard_paths, labels, config.data.num_classes))

    if config.data.name == data.EmbeddedDigits.name:
        images = np.concatenate(list(_iterate_shards(shard_paths)))
        quality = evaluation.digits_quality(images, all_labels, data_dir=config.data.data_dir)
        quality["per_class_accuracy"] = [float(x) for x in quality["per_class_accuracy"]]
        result.update(quality)
    if inception_path is not None:
        result["inception_preprocessing"] = inception_preprocessing
        result.update(
            inception_metrics(
                shard_paths, inception_path, reference_path, output_dir, inception_preprocessing
            )
        )
    elif config.data.name != data.EmbeddedDigits.name:
        logging.info("No Inception weights given: run ADM's evaluator on %s", npz_path)
    result["scores"] = files.join(output_dir, name + ".json")
    column_per_class = labels == "balanced" and 0 < config.data.num_classes <= 20
    result["grid_layout"] = "column k = class k" if column_per_class else "row by row"
    files.write_atomically(result["scores"], json.dumps(result, indent=2))
    return result


def summary_lines(result: dict) -> list[str]:
    """The closing summary of `evaluate`'s result: what was drawn, where it is, the scores."""
    guidance = "none" if result["cfg_scale"] in (None, 1.0) else f"{result['cfg_scale']:g}"
    lines = [
        f"Evaluated {result['model']} at step {result['step']}: {result['num_samples']} samples "
        f"({result['sampler']}, {result['steps']} steps, guidance {guidance}, seed "
        f"{result['seed']}, {result['labels']} labels)",
        f"  samples  {summary.shown_path(result['samples'])}",
    ]
    grid = f"  grid     {summary.shown_path(result['grid'])}"
    if "grid_layout" in result:
        grid += f" ({result['grid_layout']})"
    lines.append(grid)
    if "scores" in result:
        lines.append(f"  scores   {summary.shown_path(result['scores'])}")
    if "accuracy" in result:
        lines.append(
            f"  digits   {result['accuracy']:.1%} classified as the requested digit (real "
            f"digits at this size: {result['held_out_accuracy']:.1%}); Frechet distance "
            f"{result['frechet_distance']:.1f} (real: {result['held_out_frechet_distance']:.1f})"
        )
    adm = [f"{name} {result[name]:.4g}" for name in ADM_METRICS if name in result]
    if adm:
        lines.append(f"  ADM      {', '.join(adm)}")
    return lines
