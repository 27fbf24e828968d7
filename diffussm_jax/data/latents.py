"""Latent datasets: encode images once with the frozen VAE and store the latents as a tfds dataset.

    extract_latents(
        source="imagenet2012", split="train", data_dir=TFDS_DIR,   # or "folder:/path/to/images"
        vae_path="weights/sd-vae-ft-ema", resolution=256,
        output_name="imagenet2012_latents_256", output_data_dir=TFDS_DIR)
    tfds.data_source("imagenet2012_latents_256", split="train", data_dir=TFDS_DIR)

What is written (`<output_data_dir>/<output_name>/1.0.0/`, array_record, readable by
`tfds.data_source` and the project's loader):

  latent:  (R/8, R/8, 4) float32 (or float16): the VAE posterior mean, *unscaled* (the training
           config multiplies by `data.latent_scale`, 0.18215).
  label:   int class label (labelled sources only).
  flipped: bool, whether the image was mirrored before encoding.
  index:   int64, the image's index in the source (tfds record index or sorted file index).

Every image gives two consecutive records, the latent of the ADM-center-cropped image and the
latent of its horizontal mirror, so record 2i is image i and 2i + 1 its flip. A mirrored latent
is not the mirror of the latent (the encoder is not equivariant), so flips are encoded, as
fast-DiT's feature extraction does; train with `data.random_flip=False`: shuffling over both
records gives every epoch both orientations.

Sharding and resumption: images are split into fixed shards of `images_per_shard`; shard k is
written by process k % process_count, its batches split over that process's local devices.
Each shard file is written under a temporary name and renamed when complete, so an interrupted
run leaves only whole shards and a rerun of the same command skips them: no duplicates, no
gaps. `extraction.json` records the settings (source, resolution, VAE checksum, shard size),
and a rerun with different settings is refused. The dataset becomes readable (dataset_info.json)
only once every shard exists.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from diffussm_jax import console, files
from diffussm_jax import vae as vae_lib
from diffussm_jax.data.embedded_digits import default_data_dir
from diffussm_jax.data.input_pipeline import open_data_source
from diffussm_jax.data.preprocessing import adm_center_crop
from diffussm_jax.vae import codec

VERSION = "1.0.0"
MANIFEST_NAME = "extraction.json"
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


# ---------------------------------------------------------------------------------------------
# Image sources


@dataclasses.dataclass
class ImageSource:
    """Random access to (H, W, C) uint8 images and int labels.

    Attributes:
      name: what the images are, for the manifest (e.g. "imagenet2012:train").
      length: number of images.
      num_classes: 0 for unlabelled sources.
      read: index -> (image (H, W, C) uint8 with C in {1, 3, 4}, label int).
    """

    name: str
    length: int
    num_classes: int
    read: Callable[[int], tuple[np.ndarray, int]]


def _tfds_source(name: str, split: str, data_dir: str | None) -> ImageSource:
    data_dir = data_dir or default_data_dir()
    records = open_data_source(name, split=split, data_dir=data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"{name} has no 'image' feature; its features are {sorted(features)}.")
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0

    def read(index: int) -> tuple[np.ndarray, int]:
        example = records[index]
        return np.asarray(example["image"]), int(example["label"]) if num_classes else 0

    return ImageSource(f"{name}:{split}", len(records), num_classes, read)


def _folder_source(root: str) -> ImageSource:
    """Images under `root`, sorted by relative path; top-level subdirectories are the classes."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    paths = sorted(
        os.path.relpath(path, root)
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if path.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
    classes = sorted({path.split(os.sep)[0] for path in paths if os.sep in path})
    if classes and len(classes) != len({p.split(os.sep)[0] for p in paths}):
        raise ValueError(
            f"{root} mixes images at the top level with class subdirectories {classes[:5]}; put "
            "every image in a class subdirectory, or none."
        )
    class_index = {name: i for i, name in enumerate(classes)}

    def read(index: int) -> tuple[np.ndarray, int]:
        path = paths[index]
        try:
            with Image.open(os.path.join(root, path)) as image:
                array = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise OSError(f"Cannot read image {os.path.join(root, path)}: {error}") from error
        return array, class_index[path.split(os.sep)[0]] if classes else 0

    return ImageSource(f"folder:{root}", len(paths), len(classes), read)


def open_image_source(source: str, *, split: str = "train", data_dir: str | None = None):
    """ "folder:/path" -> the images in a folder; anything else -> a prepared tfds dataset.

    tfds names include "imagenet2012", "lsun/church_outdoor" and "embedded_digits" (built on
    first use). Returns an `ImageSource`.
    """
    if source.startswith(FOLDER_PREFIX):
        return _folder_source(source[len(FOLDER_PREFIX) :])
    return _tfds_source(source, split, data_dir)


def default_output_name(source: str, resolution: int) -> str:
    """The tfds name of a source's latents: "lsun/bedroom", 256 -> "lsun_bedroom_latents_256"."""
    if source.startswith(FOLDER_PREFIX):
        base = os.path.basename(os.path.normpath(source[len(FOLDER_PREFIX) :]))
    else:
        base = source
    base = "".join(c if c.isalnum() else "_" for c in base.lower()).strip("_")
    return f"{base}_latents_{resolution}"


def prepare_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Any (H, W, C) uint8 image -> (resolution, resolution, 3) uint8: RGB, ADM center crop."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected an (H, W, C) uint8 image, got {image.shape} {image.dtype}.")
    if image.shape[-1] == 4:  # RGBA: drop alpha
        image = image[..., :3]
    image = adm_center_crop(np.ascontiguousarray(image), resolution)
    if image.shape[-1] == 1:  # grayscale, e.g. the digits
        image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] != 3:
        raise ValueError(f"Expected 1, 3 or 4 channels, got {image.shape[-1]}.")
    return image


# ---------------------------------------------------------------------------------------------
# The layout on disk


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which images go to which shard file. Shard k holds images [k*S, min((k+1)*S, N))."""

    num_images: int
    images_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.images_per_shard)

    def images(self, shard: int) -> range:
        start = shard * self.images_per_shard
        return range(start, min(start + self.images_per_shard, self.num_images))

    def shards_of_process(self, process_index: int, process_count: int) -> list[int]:
        return list(range(process_index, self.num_shards, process_count))


def shard_path(version_dir: str, name: str, split: str, shard: int, num_shards: int) -> str:
    return files.join(version_dir, f"{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}")


def latent_features(shape: Sequence[int], num_classes: int, dtype) -> tfds.features.FeaturesDict:
    features = {
        "latent": tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype)),
        "flipped": tfds.features.Scalar(dtype=np.bool_),
        "index": tfds.features.Scalar(dtype=np.int64),
    }
    if num_classes:
        features["label"] = tfds.features.ClassLabel(num_classes=num_classes)
    return tfds.features.FeaturesDict(features)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with files.open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_manifest(version_dir: str, manifest: dict[str, Any]) -> None:
    """Writes extraction.json, or checks that an earlier run used the same settings."""
    manifest = json.loads(json.dumps(manifest))  # compare as stored (tuples become lists)
    path = files.join(version_dir, MANIFEST_NAME)
    if files.exists(path):
        previous = json.loads(files.read_text(path))
        differences = {
            key: (previous.get(key), manifest[key])
            for key in manifest
            if previous.get(key) != manifest[key]
        }
        if differences:
            raise ValueError(
                f"{version_dir} holds latents extracted with other settings (earlier, now): "
                f"{differences}. Mixing them would corrupt the dataset: choose another "
                "--output_name, or delete the directory to start over."
            )
        return
    files.write_atomically(path, json.dumps(manifest, indent=2))


# ---------------------------------------------------------------------------------------------
# Encoding


def _with_flips(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) -> (2B, H, W, 3): image 0, its mirror, image 1, its mirror, ..."""
    return np.stack([images, images[:, :, ::-1]], axis=1).reshape(-1, *images.shape[1:])


def _pad_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Repeats the last image up to `size` images."""
    missing = size - len(images)
    if not missing:
        return images
    return np.concatenate([images, np.repeat(images[-1:], missing, axis=0)])


@dataclasses.dataclass
class ExtractionResult:
    """What one call did: shards written now, skipped (already done), and whether it is complete."""

    version_dir: str
    written: list[int]
    skipped: list[int]
    complete: bool
    images_per_second: float


def extract_latents(
    *,
    source: str,
    vae_path: str,
    resolution: int,
    output_name: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    output_data_dir: str | None = None,
    images_per_shard: int = 1024,
    batch_size: int = 32,
    latent_dtype: str = "float32",
    max_images: int | None = None,
    max_shards: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    reader_threads: int = 8,
    progress: bool = True,
) -> ExtractionResult:
    """Encodes a source's images (and their mirrors) into a latent tfds dataset; resumable.

    Args:
      source: a prepared tfds dataset name ("imagenet2012", "lsun/church_outdoor",
        "embedded_digits") or "folder:/path/to/images" (class = top-level subdirectory).
      vae_path: directory with diffusers' config.json + diffusion_pytorch_model.safetensors.
      resolution: ADM center-crop size, a multiple of the VAE's downsample factor (8 for SD).
      output_name: tfds name of the result; default `default_output_name(source, resolution)`.
      split: source split (tfds sources).
      data_dir: tfds data directory of the source.
      output_data_dir: where the result goes; default data_dir (or tfds' default).
      images_per_shard: images per shard file (each gives 2 records); the unit of resumption.
      batch_size: images per encoder call on this process (x2 with flips), rounded up to a
        multiple of the local device count.
      latent_dtype: "float32" or "float16" (half the disk; training reads either as float32).
      max_images: only the first max_images images of the source (for trials and timing).
      max_shards: stop after writing this many shards in this call (the rest on a rerun).
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
      reader_threads: threads that read and crop images while the devices encode.
      progress: report progress (images/s, ETA) on process 0: a bar on a terminal, else a
        line every `console.configure` interval.

    Returns:
      An `ExtractionResult`; `complete` is True once every shard and the metadata exist.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    output_name = output_name or default_output_name(source, resolution)
    output_data_dir = output_data_dir or data_dir or default_data_dir()
    model, params = vae_lib.load(vae_path)
    factor = model.config.downsample_factor
    if resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution={resolution} must be a positive multiple of the VAE's downsample "
            f"factor {factor}."
        )
    if latent_dtype not in ("float32", "float16"):
        raise ValueError(f"latent_dtype={latent_dtype!r}; choose float32 or float16.")
    images_source = open_image_source(source, split=split, data_dir=data_dir)
    num_images = (
        images_source.length if max_images is None else min(max_images, images_source.length)
    )
    plan = ShardPlan(num_images, images_per_shard)
    latent_shape = (resolution // factor, resolution // factor, model.config.latent_channels)
    features = latent_features(latent_shape, images_source.num_classes, latent_dtype)

    version_dir = files.join(files.resolve(output_data_dir), output_name, VERSION)
    files.makedirs(version_dir)
    _check_manifest(
        version_dir,
        dict(
            source=images_source.name,
            num_images=num_images,
            num_classes=images_source.num_classes,
            resolution=resolution,
            crop="adm_center_crop",
            images_per_shard=images_per_shard,
            latent_shape=list(latent_shape),
            latent_dtype=latent_dtype,
            stored="posterior mean, unscaled; records 2i / 2i+1: image i / its mirror",
            vae_config=dataclasses.asdict(model.config),
            vae_weights_sha256=file_sha256(files.join(vae_path, vae_lib.weights.WEIGHTS_NAME)),
        ),
    )

    mine = plan.shards_of_process(process_index, process_count)
    path = lambda shard: shard_path(version_dir, output_name, split, shard, plan.num_shards)
    skipped = [shard for shard in mine if files.exists(path(shard))]
    todo = [shard for shard in mine if shard not in skipped]
    if max_shards is not None:
        todo = todo[:max_shards]
    logging.info(
        "%s -> %s: %d images in %d shards; this process (%d of %d) has %d done, writes %d now.",
        images_source.name,
        version_dir,
        num_images,
        plan.num_shards,
        process_index,
        process_count,
        len(skipped),
        len(todo),
    )

    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("batch",))
    encode = codec.make_encode_fn(model, mesh)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    # Each encoder call sees 2 * batch_size images (with mirrors), split over the devices.
    batch_size = -(-batch_size // len(devices)) * len(devices)

    def load(index: int) -> tuple[np.ndarray, int, int]:
        image, label = images_source.read(index)
        return prepare_image(image, resolution), label, index

    total = sum(len(plan.images(shard)) for shard in todo)
    reporter = console.Progress(
        total, label="encoded", item_name="img", enabled=progress and process_index == 0
    )
    start = time.perf_counter()
    done = 0
    with concurrent.futures.ThreadPoolExecutor(reader_threads) as pool:
        for shard in todo:
            indices = list(plan.images(shard))
            shard_start = time.perf_counter()
            records = []
            # Read ahead: the pool prepares the shard's images while earlier batches encode.
            prepared = pool.map(load, indices)
            for first in range(0, len(indices), batch_size):
                chunk = [next(prepared) for _ in indices[first : first + batch_size]]
                images = _with_flips(np.stack([image for image, _, _ in chunk]))
                # One batch shape for every call (no recompiles): pad the last one.
                means = np.asarray(encode(params, _pad_batch(images, 2 * batch_size)))
                means = means[: len(images)].astype(latent_dtype)
                for position, (_, label, index) in enumerate(chunk):
                    for flipped in (False, True):
                        record = {
                            "latent": means[2 * position + flipped],
                            "flipped": flipped,
                            "index": index,
                        }
                        if images_source.num_classes:
                            record["label"] = label
                        records.append(features.serialize_example(record))
                reporter.advance(done + first + len(chunk))
            _write_records(path(shard), records)
            done += len(indices)
            elapsed = time.perf_counter() - start
            reporter.report(done)
            logging.debug(
                "shard %d/%d: %d images in %.1fs; %d/%d images this run, %.3g images/s",
                shard + 1,
                plan.num_shards,
                len(indices),
                time.perf_counter() - shard_start,
                done,
                total,
                done / elapsed,
            )
    reporter.close()
    rate = done / max(time.perf_counter() - start, 1e-9)

    if process_count > 1 and jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"extract_latents:{output_name}")
    complete = False
    if process_index == 0:
        complete = finalize(version_dir, output_name, split, plan, features, manifest_source=source)
    return ExtractionResult(version_dir, todo, skipped, complete, rate)


def _write_records(path: str, records: list[bytes]) -> None:
    """Writes one shard so that it is whole or absent: built in a local temporary file, then
    renamed beside it (local disk) or uploaded in one piece (a bucket), see `files.publish`."""
    tmp = files.local_temporary(path)
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    files.publish(tmp, path)


def finalize(
    version_dir: str,
    name: str,
    split: str,
    plan: ShardPlan,
    features: tfds.features.FeaturesDict,
    manifest_source: str = "",
) -> bool:
    """Writes dataset_info.json once every shard exists; returns whether the dataset is complete."""
    paths = [
        shard_path(version_dir, name, split, k, plan.num_shards) for k in range(plan.num_shards)
    ]
    missing = [k for k, path in enumerate(paths) if not files.exists(path)]
    if missing:
        logging.warning(
            "%s: %d of %d shards missing (e.g. %s); rerun the same command to finish them.",
            version_dir,
            len(missing),
            plan.num_shards,
            missing[:5],
        )
        return False
    for stale in files.listdir(version_dir):
        if ".tmp" in stale:
            files.remove(files.join(version_dir, stale))  # leftovers of interrupted writes
    manifest = files.read_text(files.join(version_dir, MANIFEST_NAME))
    split_info = tfds.core.SplitInfo(
        name=split,
        shard_lengths=[2 * len(plan.images(k)) for k in range(plan.num_shards)],
        num_bytes=sum(files.size(path) for path in paths),
    )
    tfds.folder_dataset.write_metadata(
        data_dir=version_dir,
        features=features,
        split_infos=[split_info],
        filename_template=FILENAME_TEMPLATE,
        check_data=False,
        description=(
            f"VAE latents of {manifest_source}: records 2i / 2i+1 are image i / its mirror "
            f"(diffussm_jax.data.latents). Extraction settings:\n{manifest}"
        ),
        disable_shuffling=True,
    )
    logging.info("Latent dataset complete: %s", version_dir)
    return True
