"""Input pipeline: tfds array_record sources read by a grain DataLoader, one shard per process.

    loader = create_loader("embedded_digits", split="train", seed=0,
                           per_process_batch_size=per_process_batch_size(global_batch_size))
    iterator = iter(loader)
    batch = next(iterator)               # {"image": (b, H, W, C) float32, "label": (b,) int32}
    state = iterator.get_state()         # bytes; iterator.set_state(state) resumes exactly
    global_batch = make_global_batch(batch, mesh)

Two ways to split the data over processes:
  * `create_loader` (evaluation, latents): records are split into `process_count` contiguous,
    disjoint blocks (grain's `ShardOptions`); each process shuffles its block with a per-epoch
    permutation derived from `seed`, repeats forever (or `num_epochs` times) and batches.
  * `create_global_loader` (training): one global example stream, the same on any number of
    processes: all records shuffled per epoch with `seed`; global batch k is stream positions
    [start + k G, start + (k + 1) G), and each process reads the rows of it that its devices
    hold (`process_rows`). The data position is one number, the stream position, so a run
    checkpointed on P processes x D devices resumes on P' x D' with the same global batches.
    On one process it yields exactly `create_loader`'s batches.
Per-example randomness (the flip) is drawn from a generator seeded by (seed, position in the
stream), so a resumed iterator reproduces it. The pipeline never downloads: datasets other than
the embedded digits must be prepared in `data_dir` beforehand, in the array_record format.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffussm_jax.data import embedded_digits
from diffussm_jax.data.preprocessing import adm_center_crop, to_model_range


class DatasetNotPreparedError(FileNotFoundError):
    """The requested dataset is not in data_dir in a readable (array_record) form."""


class CorruptRecordError(RuntimeError):
    """A record could not be read or does not hold an (H, W, C) image."""


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """Splits the global batch evenly over processes (default: `jax.process_count()`)."""
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    return global_batch_size // process_count


def _how_to_prepare(name: str, data_dir: str) -> str:
    return (
        "This pipeline never downloads. Prepare the dataset once, in the array_record format, "
        f"e.g.\n  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
        "(add --manual_dir=... for datasets such as imagenet2012 that need a manual download), "
        "or in Python:\n"
        f"  tfds.builder({name!r}, data_dir={data_dir!r}, "
        "file_format='array_record').download_and_prepare()"
    )


def open_data_source(
    name: str, *, split: str, data_dir: str | os.PathLike | None = None
) -> grain.sources.RandomAccessDataSource:
    """Opens a prepared tfds dataset for random access; builds the embedded digits if needed.

    Args:
      name: tfds name, e.g. "embedded_digits", "imagenet2012", "lsun/church_outdoor", or the
        name of any dataset written to data_dir by a custom builder (e.g. cached latents).
      split: tfds split string; slices such as "train[:4500]" work.
      data_dir: tfds data directory; None means `embedded_digits.default_data_dir()`.

    Returns:
      A source with `len()` and `[index] -> dict of numpy feature values`.

    Raises:
      DatasetNotPreparedError: the dataset is missing from data_dir or not array_record.
      ValueError: data_dir is a bucket URL (training reads records from a local or mounted disk).
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else embedded_digits.default_data_dir()
    if data_dir.startswith(("gs://", "s3://")):
        # array_record's reader (grain's random access) opens local files only; against a GCS
        # emulator it never returns. Reading records at training speed wants a disk anyway.
        raise ValueError(
            f"data_dir={data_dir!r} is a bucket; training reads its records from a local or "
            "mounted disk. Copy the dataset down (e.g. gcloud storage cp -r "
            f"{data_dir.rstrip('/')}/{name} /data/tfds/{name}) or mount the bucket (gcsfuse), "
            "and pass that directory (/data/tfds) as --config.data.data_dir."
        )
    if name == embedded_digits.NAME:
        embedded_digits.prepare_embedded_digits(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DatasetNotPreparedError(
            f"Dataset {name!r} is neither a registered tfds dataset nor prepared in data_dir "
            f"{data_dir!r}.\n{_how_to_prepare(name, data_dir)}"
        ) from error
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"Dataset {name!r} is not prepared in data_dir {data_dir!r} (no "
            f"{builder.data_path}/dataset_info.json).\n{_how_to_prepare(name, data_dir)}"
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DatasetNotPreparedError(
            f"Dataset {name!r} in data_dir {data_dir!r} is stored as "
            f"{builder.info.file_format.value}, which has no random access. Convert it with\n"
            f"  tfds convert_format --dataset_version_dir={builder.data_path} "
            "--out_file_format=array_record\nor rebuild it.\n"
            f"{_how_to_prepare(name, data_dir)}"
        )
    return builder.as_data_source(split=split)


class _CheckedSource(grain.sources.RandomAccessDataSource):
    """Reads records, keeps only the image and label, and names the record index on failure."""

    def __init__(self, source: Sequence[Mapping[str, Any]], image_key: str, label_key: str | None):
        self._source = source
        self._image_key = image_key
        self._label_key = label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, record_index: int) -> dict[str, np.ndarray]:
        try:
            example = self._source[record_index]
        except Exception as error:
            raise CorruptRecordError(
                f"Record {record_index} of {self._source!r} could not be read: {error}. The "
                "dataset files are damaged (an interrupted download, build or copy?): rebuild "
                "the dataset (tfds build, or the prepare step in README) or copy it again."
            ) from error
        missing = [key for key in (self._image_key, self._label_key) if key and key not in example]
        if missing:
            raise KeyError(
                f"Record {record_index} of {self._source!r} has no feature {missing}; its features "
                f"are {sorted(example)}. Set image_key / label_key accordingly."
            )
        image = np.asarray(example[self._image_key])
        if image.ndim != 3:
            raise CorruptRecordError(
                f"Record {record_index} of {self._source!r}: {self._image_key!r} has shape "
                f"{image.shape}, expected (H, W, C). Check config.data.image_key names the image "
                "feature, or rebuild the dataset if this record is damaged."
            )
        output = {"image": image}
        if self._label_key is not None:
            output["label"] = np.int32(example[self._label_key])
        return output

    def __repr__(self) -> str:
        # grain compares this repr when restoring an iterator state, so it names the inputs.
        return (
            f"_CheckedSource({self._source!r}, image_key={self._image_key!r}, "
            f"label_key={self._label_key!r})"
        )


class _Preprocess(grain.transforms.RandomMap):
    """(H, W, C) image -> optional ADM center crop -> optional flip -> float32 in [-1, 1]."""

    def __init__(self, center_crop: int | None, random_flip: bool):
        self._center_crop = center_crop
        self._random_flip = random_flip

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator):
        image = example["image"]
        if self._center_crop is not None:
            image = adm_center_crop(image, self._center_crop)
        if self._random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {**example, "image": to_model_range(image)}


def create_loader_from_source(
    source: Sequence[Mapping[str, Any]],
    *,
    per_process_batch_size: int,
    seed: int = 0,
    image_key: str = "image",
    label_key: str | None = "label",
    center_crop: int | None = None,
    random_flip: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.DataLoader:
    """A grain DataLoader over any random-access source of feature dicts.

    See `create_loader` for the arguments; `source` is anything with `len()` and
    `[index] -> {image_key: (H, W, C) array, label_key: int}`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if per_process_batch_size <= 0:
        raise ValueError(f"per_process_batch_size={per_process_batch_size} must be positive.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    num_records = len(source)
    records_per_process = num_records // process_count
    if records_per_process < per_process_batch_size:
        raise ValueError(
            f"Each of {process_count} processes holds {records_per_process} of {num_records} "
            f"records, fewer than per_process_batch_size={per_process_batch_size}."
        )
    # Shard drop_remainder keeps every process at the same number of batches per epoch, which
    # multi-host eval loops rely on; it drops at most process_count - 1 records.
    shard_options = grain.sharding.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=drop_remainder
    )
    sampler = grain.samplers.IndexSampler(
        num_records=num_records,
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    return _batched_loader(
        source,
        sampler,
        shard_options,
        batch_size=per_process_batch_size,
        drop_remainder=drop_remainder,
        image_key=image_key,
        label_key=label_key,
        center_crop=center_crop,
        random_flip=random_flip,
        worker_count=worker_count,
        read_options=read_options,
    )


def _batched_loader(
    source,
    sampler,
    shard_options,
    *,
    batch_size: int,
    drop_remainder: bool,
    image_key: str,
    label_key: str | None,
    center_crop: int | None,
    random_flip: bool,
    worker_count: int,
    read_options: grain.ReadOptions | None,
) -> grain.DataLoader:
    """The loader both readers share: checked records, preprocessing, batching."""
    checked = _CheckedSource(source, image_key, label_key)
    # Fail at construction, not at the first batch, on a wrong image_key / label_key.
    checked[0]
    return grain.DataLoader(
        data_source=checked,
        sampler=sampler,
        operations=[
            _Preprocess(center_crop, random_flip),
            grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder),
        ],
        shard_options=shard_options,
        worker_count=worker_count,
        read_options=read_options,
    )


def create_loader(
    name: str = embedded_digits.NAME,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    per_process_batch_size: int,
    seed: int = 0,
    image_key: str = "image",
    label_key: str | None = "label",
    center_crop: int | None = None,
    random_flip: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.DataLoader:
    """This process's batches of a prepared tfds dataset.

    Args:
      name: tfds dataset name (see `open_data_source`).
      split: tfds split string.
      data_dir: tfds data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      per_process_batch_size: examples per batch on this process; see `per_process_batch_size`.
      seed: non-negative 32-bit int; fixes the per-epoch shuffles and the flips.
      image_key: feature holding the (H, W, C) uint8 image, or float latent ("latent").
      label_key: feature holding the int class label; None for unconditional data.
      center_crop: if set, ADM center crop to (center_crop, center_crop) (the raw images' crop,
        `config.data.center_crop`); None keeps the stored size.
      random_flip: horizontal flip with probability 1/2 (never for digits: they are not
        mirror symmetric).
      shuffle: reshuffle each epoch; False reads records in stored order (e.g. for eval).
      num_epochs: None repeats forever.
      drop_remainder: drop the last partial batch, and the < process_count records that do
        not split evenly over processes.
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
      worker_count: grain worker processes for decoding; 0 decodes in this process. The
        example order depends on it, and a saved iterator state only restores into a loader
        with the same worker_count. Workers > 0 need absl flags parsed (absl.app.run does it).
      read_options: grain reader threads and prefetch depth (default: 16 threads, 500
        records ahead); fewer threads are faster on hosts with few cores.

    Returns:
      A grain DataLoader; `iter()` gives an iterator with `get_state()` / `set_state()` whose
      batches are {"image": (b, H, W, C) float32 in [-1, 1] (latents: as stored), "label": (b,)
      int32} with b = per_process_batch_size ("label" absent when label_key is None).
    """
    if name == embedded_digits.NAME and random_flip:
        raise ValueError("random_flip must be False for embedded_digits: digits are not symmetric.")
    source = open_data_source(name, split=split, data_dir=data_dir)
    return create_loader_from_source(
        source,
        per_process_batch_size=per_process_batch_size,
        seed=seed,
        image_key=image_key,
        label_key=label_key,
        center_crop=center_crop,
        random_flip=random_flip,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        read_options=read_options,
    )


class GlobalOrderSampler:
    """This process's share of a global example stream that does not depend on the topology.

    The stream is grain's `IndexSampler` over all records as one shard: each epoch a fresh
    permutation from `seed`, and for stream position j the per-example generator
    Philox(seed + j). Global batch k covers positions [start + k G, start + (k + 1) G); this
    process reads rows `rows` of each, so its element i is position
    start + (i // b) G + rows[i % b], with b = len(rows). Implements grain's sampler protocol.
    """

    def __init__(
        self,
        num_records: int,
        *,
        global_batch_size: int,
        rows: Sequence[int],
        start: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ):
        self._rows = np.asarray(rows, np.int64)
        if start < 0 or len(self._rows) == 0:
            raise ValueError(f"start={start} must be >= 0 and rows must not be empty.")
        if self._rows.min() < 0 or self._rows.max() >= global_batch_size:
            raise ValueError(f"rows {rows} must lie in [0, global_batch_size={global_batch_size}).")
        self._global_batch_size = global_batch_size
        self._start = start
        self._stream = grain.samplers.IndexSampler(
            num_records=num_records,
            # One shard of all records: exactly the stream `create_loader` reads on one process.
            shard_options=grain.sharding.ShardOptions(
                shard_index=0, shard_count=1, drop_remainder=True
            ),
            shuffle=shuffle,
            num_epochs=num_epochs,
            seed=seed,
        )
        stream_length = len(self._stream)
        if stream_length == sys.maxsize:
            self._length = sys.maxsize
        else:  # whole global batches only, as drop_remainder=True
            self._length = max(0, (stream_length - start) // global_batch_size) * len(self._rows)
        self._description = (
            f"GlobalOrderSampler(num_records={num_records}, global_batch_size="
            f"{global_batch_size}, rows={self._rows.tolist()}, start={start}, seed={seed}, "
            f"shuffle={shuffle}, num_epochs={num_epochs})"
        )

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return self._description

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} outside [0, {self._length})")
        batch, row = divmod(index, len(self._rows))
        position = self._start + batch * self._global_batch_size + int(self._rows[row])
        stream = self._stream[position]
        return grain.RecordMetadata(index=index, record_key=stream.record_key, rng=stream.rng)


def process_rows(
    mesh: Mesh, global_batch_size: int, partition_spec: PartitionSpec | None = None
) -> np.ndarray:
    """Rows of a (global_batch_size, ...) array sharded by `partition_spec` that this process's
    devices hold, sorted: the order in which `make_global_batch` places this process's batch.

    Returns:
      (global_batch_size // share,) int64 row indices, for any mesh and process layout.
    """
    if partition_spec is None:
        partition_spec = PartitionSpec(mesh.axis_names)
    sharding = NamedSharding(mesh, partition_spec)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return np.asarray(sorted(rows), np.int64)


def create_global_loader(
    name: str = embedded_digits.NAME,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    global_batch_size: int,
    rows: Sequence[int],
    start: int = 0,
    seed: int = 0,
    image_key: str = "image",
    label_key: str | None = "label",
    center_crop: int | None = None,
    random_flip: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.DataLoader:
    """This process's rows of the global batches of a prepared tfds dataset (training).

    Args:
      global_batch_size: G, examples per global batch (all processes together).
      rows: the rows of each global batch this process reads (`process_rows(mesh, G)`);
        `range(G)` on one process.
      start: stream position of the first example (the data position of a resumed run:
        examples already consumed).
      Others: as `create_loader`.

    Returns:
      A grain DataLoader yielding {"image": (len(rows), H, W, C) float32, "label":
      (len(rows),) int32}: the same global batches, in the same order, on any number of
      processes, since element i is stream position start + (i // b) G + rows[i % b].
    """
    if name == embedded_digits.NAME and random_flip:
        raise ValueError("random_flip must be False for embedded_digits: digits are not symmetric.")
    source = open_data_source(name, split=split, data_dir=data_dir)
    if len(source) < global_batch_size:
        raise ValueError(
            f"The dataset holds {len(source)} records, fewer than global_batch_size="
            f"{global_batch_size}."
        )
    sampler = GlobalOrderSampler(
        len(source),
        global_batch_size=global_batch_size,
        rows=rows,
        start=start,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
    )
    return _batched_loader(
        source,
        sampler,
        grain.sharding.NoSharding(),
        batch_size=len(rows),
        drop_remainder=True,
        image_key=image_key,
        label_key=label_key,
        center_crop=center_crop,
        random_flip=random_flip,
        worker_count=worker_count,
        read_options=read_options,
    )


def make_global_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, partition_spec: PartitionSpec | None = None
) -> dict[str, jax.Array]:
    """Assembles each process's batch into global jax.Arrays sharded over the batch axis.

    Args:
      batch: this process's batch, leaves (b, ...) with b = per-process batch size.
      mesh: the device mesh.
      partition_spec: how the leading (batch) dimension is sharded; default shards it over all
        mesh axes, e.g. PartitionSpec(("data", "fsdp")).

    Returns:
      Leaves of shape (b * process_count, ...), sharded per partition_spec.
    """
    if partition_spec is None:
        partition_spec = PartitionSpec(mesh.axis_names)
    batch_axes = partition_spec[0] if len(partition_spec) else None
    if batch_axes is None:
        batch_axes = ()
    elif isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    num_batch_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
    sharding = NamedSharding(mesh, partition_spec)
    global_batch = {}
    for key, local in batch.items():
        global_batch_size = local.shape[0] * jax.process_count()
        if global_batch_size % num_batch_shards:
            raise ValueError(
                f"Global batch size {global_batch_size} (= {local.shape[0]} per process x "
                f"{jax.process_count()} processes) of {key!r} is not divisible by the "
                f"{num_batch_shards} batch shards of mesh axes {batch_axes} "
                f"(mesh shape {dict(mesh.shape)})."
            )
        global_batch[key] = jax.make_array_from_process_local_data(sharding, local)
    return global_batch
