"""Offline sample quality for the embedded digits: a small CNN stands in for Inception.

No Inception weights ship with this package, and 32x32 grey digits are far from ImageNet anyway.
Instead a small classifier is trained here on `data.CLASSIFIER_TRAIN_SPLIT` (4500 digits, 20-35 s
on 2 busy CPU cores, 97.2-97.6% on the 500 held-out digits of `data.CLASSIFIER_TEST_SPLIT` for
seeds 0-2) and cached as an .npz of weights. It scores class-conditional samples two ways:

  accuracy          fraction of samples the classifier assigns to the requested class
                    (does conditioning work?), also per class;
  frechet_distance  the FID formula on the classifier's 128-d penultimate features, samples
                    against the 4500 training digits (do samples look like the data?).

    result = digits_quality(samples, labels)    # samples (N, 32, 32, 1) in [-1, 1] or uint8
    result["accuracy"], result["frechet_distance"]
    result["held_out_frechet_distance"]         # the same distance for 500 real unseen digits

The held-out numbers give the scale: real digits the classifier never saw reach
`classifier_test_accuracy` and `held_out_frechet_distance`; a model at those values is as good
as these metrics can tell.

Samples of a smaller side (16x16 digits, `configs/quickstart.py`'s default) are scored at the
classifier's 32x32 by a bilinear upsampling, and the held-out reference is then the real digits
taken through the same round trip (the input pipeline's BOX-filter downsampling, then the same
upsampling), and so are the training digits whose statistics the Frechet distance compares
with: a model is compared with real digits at its own resolution.

Like FID, the Frechet distance shrinks as N grows (its estimate is biased upwards for small N),
so compare runs at the same N, ideally N = 500 (50 per class) to compare with the held-out
value.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from diffussm_jax import data, files
from diffussm_jax.evaluation import adm_io, metrics

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 1)
# Bump when the architecture or training recipe changes, so old cache files are not reused.
CLASSIFIER_VERSION = 1
CACHE_FILENAME = f"digits_classifier_v{CLASSIFIER_VERSION}.npz"
# Fixed inference batch: one compilation for any number of images.
_EVAL_BATCH_SIZE = 500


def default_cache_path() -> str:
    """`$XDG_CACHE_HOME/diffussm_jax/digits_classifier_v1.npz` (default ~/.cache)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "diffussm_jax", CACHE_FILENAME)


class DigitClassifier(nn.Module):
    """Three strided convolutions and a dense feature layer; 189K parameters.

    Strided convolutions rather than pooling keep training fast on CPU.
    """

    feature_dim: int = 128
    width: int = 32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: (B, 32, 32, 1) in [-1, 1] -> (logits (B, 10), features (B, feature_dim))."""
        x = nn.relu(nn.Conv(self.width, (5, 5), strides=2)(images))  # (B, 16, 16, width)
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))  # (B, 8, 8, 2 width)
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))  # (B, 4, 4, 2 width)
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return nn.Dense(NUM_CLASSES)(features), features


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Training recipe, recorded in the cache file.

    The defaults reach 97.2-97.6% held-out accuracy for seeds 0-2 (10 epochs of 70 steps).
    """

    seed: int = 0
    num_epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3  # peak of a cosine decay to 0
    weight_decay: float = 1e-4
    max_shift: int = 2  # random translations of up to this many pixels, against overfitting


_MODEL = DigitClassifier()


@functools.lru_cache(maxsize=4)
def load_digits(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All digits of a split of the embedded dataset, in stored (class round-robin) order.

    Returns:
      images: (N, 32, 32, 1) float32 in [-1, 1]; labels: (N,) int32. Both read-only (cached).
    """
    source = data.open_data_source("embedded_digits", split=split, data_dir=data_dir)
    records = source.__getitems__(list(range(len(source))))
    images = data.to_model_range(np.stack([record["image"] for record in records]))
    labels = np.asarray([record["label"] for record in records], dtype=np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _random_shift(rng: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image by up to max_shift pixels, filling with background (-1)."""
    if max_shift == 0:
        return images
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad, constant_values=-1.0)
    offsets = jax.random.randint(rng, (images.shape[0], 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), IMAGE_SHAPE
    )
    return jax.vmap(crop)(padded, offsets)


@jax.jit
def _apply(params, images):
    return _MODEL.apply({"params": params}, images)


def classify(params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs the classifier in fixed-size batches.

    Args:
      params: classifier parameters.
      images: (N, 32, 32, 1) float32 in [-1, 1].

    Returns:
      logits: (N, 10) float32; features: (N, 128) float32.
    """
    logits, features = [], []
    for start in range(0, len(images), _EVAL_BATCH_SIZE):
        batch = images[start : start + _EVAL_BATCH_SIZE]
        padded = np.full((_EVAL_BATCH_SIZE, *IMAGE_SHAPE), -1.0, np.float32)
        padded[: len(batch)] = batch
        batch_logits, batch_features = _apply(params, padded)
        logits.append(np.asarray(batch_logits[: len(batch)]))
        features.append(np.asarray(batch_features[: len(batch)]))
    return np.concatenate(logits), np.concatenate(features)


def _optimizer(config: ClassifierConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.adamw(
        optax.cosine_decay_schedule(config.learning_rate, total_steps),
        weight_decay=config.weight_decay,
    )


# Module level with a hashable config, so retraining with the same recipe reuses the compilation.
@functools.partial(jax.jit, static_argnames=("config", "total_steps"))
def _train_step(params, opt_state, images, labels, rng, *, config, total_steps):
    images = _random_shift(rng, images, config.max_shift)

    def loss_fn(params):
        logits, _ = _MODEL.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(config, total_steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(
    config: ClassifierConfig = ClassifierConfig(), data_dir: str | None = None
) -> tuple[dict, float]:
    """Trains the digit classifier from scratch; deterministic given config.seed.

    Returns:
      params: the parameter tree; test_accuracy: accuracy on CLASSIFIER_TEST_SPLIT.
    """
    start_time = time.perf_counter()
    train_images, train_labels = load_digits(data.CLASSIFIER_TRAIN_SPLIT, data_dir)
    steps_per_epoch = len(train_images) // config.batch_size
    total_steps = config.num_epochs * steps_per_epoch
    init_rng, shift_rng = jax.random.split(jax.random.key(config.seed))
    params = _MODEL.init(init_rng, jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    opt_state = _optimizer(config, total_steps).init(params)
    order_rng = np.random.default_rng(config.seed)
    step = 0
    for _ in range(config.num_epochs):
        permutation = order_rng.permutation(len(train_images))
        for batch_index in range(steps_per_epoch):
            indices = permutation[
                batch_index * config.batch_size : (batch_index + 1) * config.batch_size
            ]
            params, opt_state, loss = _train_step(
                params,
                opt_state,
                train_images[indices],
                train_labels[indices],
                jax.random.fold_in(shift_rng, step),
                config=config,
                total_steps=total_steps,
            )
            step += 1
    test_images, test_labels = load_digits(data.CLASSIFIER_TEST_SPLIT, data_dir)
    test_logits, _ = classify(params, test_images)
    test_accuracy = float(np.mean(test_logits.argmax(axis=1) == test_labels))
    logging.info(
        "Trained the digits classifier: %d steps in %.1f s, final loss %.4f, test accuracy %.4f.",
        step,
        time.perf_counter() - start_time,
        float(loss),
        test_accuracy,
    )
    return jax.device_get(params), test_accuracy


def _config_to_arrays(config: ClassifierConfig) -> dict[str, np.ndarray]:
    return {f"config/{k}": np.asarray(v) for k, v in dataclasses.asdict(config).items()}


def save_classifier(path: str, params, test_accuracy: float, config: ClassifierConfig) -> None:
    """Writes weights and metadata to an .npz (plain arrays only), atomically."""
    arrays = {
        f"params/{name}": np.asarray(value)
        for name, value in traverse_util.flatten_dict(params, sep="/").items()
    }
    arrays.update(_config_to_arrays(config))
    arrays["meta/version"] = np.asarray(CLASSIFIER_VERSION)
    arrays["meta/test_accuracy"] = np.asarray(test_accuracy)
    # Readers never see a half-written cache, even with concurrent test workers; `path` may
    # be local or in a bucket.
    files.save_npz(path, **arrays)


def load_classifier(path: str, config: ClassifierConfig | None = None) -> tuple[dict, float]:
    """Reads weights written by `save_classifier`, checking them against the model.

    Args:
      path: the .npz file.
      config: if given, the recipe the file must have been trained with.

    Returns:
      params, and the test accuracy recorded at training time.

    Raises:
      ValueError / OSError: the file is missing, corrupt, stale or from another config.
    """
    expected = traverse_util.flatten_dict(
        jax.eval_shape(_MODEL.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"],
        sep="/",
    )
    try:
        arrays = files.load_npz(path)
    except (zipfile.BadZipFile, EOFError, KeyError) as error:
        raise ValueError(f"unreadable: {error}") from error
    if int(arrays.get("meta/version", -1)) != CLASSIFIER_VERSION:
        raise ValueError(f"version {arrays.get('meta/version')} != {CLASSIFIER_VERSION}")
    for name, value in _config_to_arrays(config).items() if config is not None else ():
        if name not in arrays or not np.array_equal(arrays[name], value):
            raise ValueError(f"trained with {name}={arrays.get(name)}, requested {value}")
    flat = {}
    for name, shape in expected.items():
        value = arrays.get(f"params/{name}")
        if value is None or value.shape != shape.shape or value.dtype != shape.dtype:
            raise ValueError(f"parameter {name} missing or not {shape.shape} {shape.dtype}")
        if not np.isfinite(value).all():
            raise ValueError(f"parameter {name} has non-finite values")
        flat[name] = value
    return traverse_util.unflatten_dict(flat, sep="/"), float(arrays["meta/test_accuracy"])


class DigitsEvaluator:
    """A trained digit classifier plus the reference feature statistics it compares against.

    Attributes:
      params: classifier parameters.
      test_accuracy: accuracy on the 500 held-out digits of CLASSIFIER_TEST_SPLIT.
      reference_statistics: (mu (128,), sigma (128, 128)) of the 4500 training digits' features
        at 32x32; `statistics_at(size)` gives them at another sample size.
    """

    def __init__(self, params, test_accuracy: float, data_dir: str | None = None):
        self.params = params
        self.test_accuracy = test_accuracy
        self._data_dir = data_dir
        self._statistics: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # by sample side
        self._held_out: dict[int, dict] = {}
        self.reference_statistics = self.statistics_at(IMAGE_SHAPE[0])

    def statistics_at(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature (mu, sigma) of the 4500 training digits taken to side `size` and back."""
        if size not in self._statistics:
            images, _ = load_digits(data.CLASSIFIER_TRAIN_SPLIT, self._data_dir)
            if size != IMAGE_SHAPE[0]:
                images = _to_model_range(downsample_digits(adm_io.to_uint8(images), size))
            self._statistics[size] = metrics.feature_statistics(classify(self.params, images)[1])
        return self._statistics[size]

    def quality(self, images: np.ndarray, requested_labels: np.ndarray) -> dict:
        """Scores class-conditional digit samples.

        Args:
          images: (N, S, S, 1) uint8 pixels, or float in [-1, 1], S = 32, 16 or 8. Floats are
            first quantised with `adm_io.to_uint8`, so in-memory samples score exactly like
            saved ones; S < 32 is upsampled to 32 (module doc).
          requested_labels: (N,) int classes the samples were generated for.

        Returns:
          num_samples: N.
          accuracy: fraction of samples classified as their requested class.
          per_class_accuracy: (10,) float64, that fraction per requested class (NaN if absent).
          frechet_distance: Frechet distance of the classifier features to the training digits'
            (at side S).
          classifier_test_accuracy: the classifier's accuracy on real held-out digits.
          held_out_frechet_distance, held_out_accuracy: frechet_distance and accuracy of the
            500 real held-out digits at side S.
        """
        size = _side(images)
        images = _to_model_range(images)
        requested_labels = np.asarray(requested_labels)
        if requested_labels.shape != (len(images),) or not np.issubdtype(
            requested_labels.dtype, np.integer
        ):
            raise ValueError(
                f"requested_labels must be ({len(images)},) ints, got {requested_labels.shape} "
                f"{requested_labels.dtype}."
            )
        if ((requested_labels < 0) | (requested_labels >= NUM_CLASSES)).any():
            raise ValueError(f"requested_labels must lie in [0, {NUM_CLASSES}).")
        result = self._score(images, requested_labels, size)
        reference = self.held_out_reference(size)
        result["held_out_frechet_distance"] = reference["frechet_distance"]
        result["held_out_accuracy"] = reference["accuracy"]
        return result

    def held_out_reference(self, size: int = IMAGE_SHAPE[0]) -> dict:
        """`quality`'s numbers for the 500 real held-out digits with their true labels.

        size: the side the samples have; real digits are taken to it and back (module doc).
        """
        if size not in self._held_out:
            images, labels = load_digits(data.CLASSIFIER_TEST_SPLIT, self._data_dir)
            if size != IMAGE_SHAPE[0]:
                images = downsample_digits(adm_io.to_uint8(images), size)
            self._held_out[size] = self._score(_to_model_range(images), labels, size)
        return dict(self._held_out[size])

    def _score(self, images: np.ndarray, labels: np.ndarray, size: int) -> dict:
        logits, features = classify(self.params, images)
        correct = logits.argmax(axis=1) == labels
        per_class = np.full(NUM_CLASSES, np.nan)
        for digit in np.unique(labels):
            per_class[digit] = correct[labels == digit].mean()
        return {
            "num_samples": len(images),
            "accuracy": float(correct.mean()),
            "per_class_accuracy": per_class,
            "frechet_distance": metrics.frechet_distance(
                *metrics.feature_statistics(features), *self.statistics_at(size)
            ),
            "classifier_test_accuracy": self.test_accuracy,
        }


def downsample_digits(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 32, 32, 1) uint8 -> (N, size, size, 1) uint8, as the input pipeline does it.

    That is `config.data.center_crop = size`: ADM's center crop, which halves with a BOX filter.
    """
    return np.stack([data.adm_center_crop(image, size) for image in images])


def _side(images: np.ndarray) -> int:
    """The side of square digit images (N, s, s, 1) with s dividing 32, checked."""
    shape = np.shape(images)
    side = shape[1] if len(shape) == 4 else 0
    if (
        len(shape) != 4
        or shape[0] < 2
        or shape[2] != side
        or shape[3] != 1
        or side < 8
        or IMAGE_SHAPE[0] % side
    ):
        raise ValueError(
            f"Expected digit images (N >= 2, 32, 32, 1), or (N, 16, 16, 1) / (N, 8, 8, 1) to be "
            f"upsampled, got {shape}."
        )
    return side


def _to_model_range(images: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) uint8 or float -> (N, 32, 32, 1) float32 in [-1, 1] on the uint8 grid.

    S < 32 is upsampled bilinearly after quantisation (see the module doc).
    """
    images = np.asarray(images)
    side = _side(images)
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"Expected uint8 or float images, got {images.dtype}.")
        images = adm_io.to_uint8(images)
    images = data.to_model_range(images)
    if side != IMAGE_SHAPE[0]:
        images = np.asarray(
            jax.image.resize(images, (len(images), *IMAGE_SHAPE), "bilinear"), np.float32
        )
    return images


def load_or_train_classifier(
    cache_path: str | os.PathLike | None = None,
    config: ClassifierConfig | None = None,
    data_dir: str | None = None,
) -> DigitsEvaluator:
    """The cached classifier, trained first (and cached) when the file is missing or unusable.

    Args:
      cache_path: weights file, local or in a bucket (`gs://...`); None means
        `default_cache_path()`.
      config: training recipe. None accepts a valid cache trained with any recipe and trains
        with `ClassifierConfig()` when there is none; a given config retrains a cache that was
        trained differently.
      data_dir: tfds data_dir of the embedded digits (None: the default).
    """
    cache_path = os.fspath(cache_path) if cache_path is not None else default_cache_path()
    loaded = None
    if files.exists(cache_path):
        try:
            loaded = load_classifier(cache_path, config)
        except (OSError, ValueError) as error:
            logging.warning(
                "Digits classifier cache %s unusable (%s); retraining.", cache_path, error
            )
    else:
        logging.info("No digits classifier at %s; training one (about 30 s on CPU).", cache_path)
    if loaded is None:
        config = config if config is not None else ClassifierConfig()
        loaded = train_classifier(config, data_dir)
        save_classifier(cache_path, *loaded, config)
    return DigitsEvaluator(*loaded, data_dir)


@functools.lru_cache(maxsize=2)
def _cached_evaluator(cache_path: str | None, data_dir: str | None) -> DigitsEvaluator:
    return load_or_train_classifier(cache_path, data_dir=data_dir)


def digits_quality(
    images: np.ndarray,
    requested_labels: np.ndarray,
    *,
    cache_path: str | os.PathLike | None = None,
    data_dir: str | None = None,
) -> dict:
    """Scores digit samples with the cached classifier; see `DigitsEvaluator.quality`.

    Args:
      images: (N, S, S, 1) uint8, or float in [-1, 1]; S = 32, or 16 or 8 (upsampled).
      requested_labels: (N,) int classes the samples were conditioned on.
      cache_path: classifier weights (trained on first use); None: `default_cache_path()`.
      data_dir: tfds data_dir of the embedded digits.
    """
    cache_path = os.fspath(cache_path) if cache_path is not None else None
    return _cached_evaluator(cache_path, data_dir).quality(images, requested_labels)
