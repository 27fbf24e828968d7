"""Input pipeline tests: the embedded digits, grain loaders, sharding, resume, global arrays.

Offline: every dataset is written by a builder into a tmp data_dir. The tiny builders below are
not registered with tfds (skip_registration), so the loader reads them the way it reads any
dataset prepared elsewhere (e.g. cached latents): from the files in data_dir.
"""

import os
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, PartitionSpec
from PIL import Image

from diffussm_jax import data
from diffussm_jax.data import embedded_digits

NUM_PHOTOS = 48
PHOTO_SHAPE = (40, 48, 3)
LATENT_SHAPE = (4, 4, 4)
# Two reader threads: the default 16 only contend for the GIL on a 2-core CI host.
FAST_READS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def _photo(index: int) -> np.ndarray:
    """Noise image, so a mirrored copy never equals the original. (40, 48, 3) uint8."""
    return np.random.default_rng(index).integers(0, 256, PHOTO_SHAPE, dtype=np.uint8)


class TinyPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """PNG-encoded RGB images like imagenet2012's; the label is the example's id."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_PHOTOS),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(NUM_PHOTOS):
            yield index, {"image": Image.fromarray(_photo(index)), "label": index}


class TinyLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Unconditional float32 latents under the feature key "latent"."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"latent": tfds.features.Tensor(shape=LATENT_SHAPE, dtype=np.float32)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index in range(16):
            yield index, {"latent": np.full(LATENT_SHAPE, index - 0.5, np.float32)}


def adm_center_crop_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr`, verbatim apart from names."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """Lets the first read build the digits in the default data_dir, here $TFDS_DATA_DIR."""
    data_dir = tmp_path_factory.mktemp("digits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFDS_DATA_DIR", str(data_dir))
        assert data.default_data_dir() == str(data_dir)
        data.open_data_source("embedded_digits", split="train")
    return data_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tiny")
    for builder_class in (TinyPhotos, TinyLatents):
        builder_class(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def _photo_loader(tiny_dir, **kwargs):
    kwargs = {"per_process_batch_size": 8, "read_options": FAST_READS, **kwargs}
    return data.create_loader("tiny_photos", split="train", data_dir=tiny_dir, **kwargs)


def _take(iterator, num_batches):
    return [next(iterator) for _ in range(num_batches)]


def _assert_same_batches(batches, expected):
    assert len(batches) == len(expected)
    for batch, expected_batch in zip(batches, expected, strict=True):
        assert batch.keys() == expected_batch.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected_batch[key])


# --- The embedded digits -------------------------------------------------------------------------


def test_embedded_digits_are_built_on_first_use_as_array_record(digits_dir):
    version_dir = digits_dir / "embedded_digits" / "1.0.0"
    assert (version_dir / "dataset_info.json").exists()
    assert list(version_dir.glob("embedded_digits-train.array_record-*"))


def test_embedded_digits_has_5000_padded_balanced_digits(digits_dir):
    source = data.open_data_source("embedded_digits", split="train", data_dir=digits_dir)
    assert len(source) == 5000
    examples = source.__getitems__(list(range(len(source))))
    images = np.stack([example["image"] for example in examples])
    labels = np.array([example["label"] for example in examples])
    assert images.shape == (5000, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    # The 28x28 digits sit in the middle: a 2-pixel zero border on every side.
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not images[:, border].any()
    ink = (images[..., 0] > 128).sum(axis=(1, 2))
    assert ink.min() >= 10 and 80 < ink.mean() < 200
    assert images.max() == 255
    # Distinct digits, not one image repeated.
    assert len({image.tobytes() for image in images}) == 5000
    # Stored in round-robin class order, matching the csv rows it was built from.
    np.testing.assert_array_equal(labels, np.arange(5000) % 10)
    csv_images, csv_labels = embedded_digits.read_mnist_5k()
    order = embedded_digits.round_robin_order(csv_labels)
    np.testing.assert_array_equal(images, csv_images[order])


def test_embedded_digits_classifier_splits_are_disjoint_and_balanced(digits_dir):
    train = data.open_data_source(
        "embedded_digits", split=data.CLASSIFIER_TRAIN_SPLIT, data_dir=digits_dir
    )
    test = data.open_data_source(
        "embedded_digits", split=data.CLASSIFIER_TEST_SPLIT, data_dir=digits_dir
    )
    train_examples = train.__getitems__(list(range(len(train))))
    test_examples = test.__getitems__(list(range(len(test))))
    assert (len(train_examples), len(test_examples)) == (4500, 500)
    for examples, per_class in ((train_examples, 450), (test_examples, 50)):
        labels = [example["label"] for example in examples]
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, per_class))
    train_bytes = {example["image"].tobytes() for example in train_examples}
    assert not any(example["image"].tobytes() in train_bytes for example in test_examples)


def test_digit_batches_are_float_in_model_range(digits_dir):
    loader = data.create_loader(
        data_dir=digits_dir, per_process_batch_size=16, read_options=FAST_READS
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    # Zero padding maps to exactly -1.
    np.testing.assert_array_equal(batch["image"][:, :2], -1.0)


def test_flip_is_refused_for_digits(digits_dir):
    with pytest.raises(ValueError, match="random_flip"):
        data.create_loader(data_dir=digits_dir, per_process_batch_size=16, random_flip=True)


# --- Order, sharding, resume ---------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_order(tiny_dir):
    first = _take(iter(_photo_loader(tiny_dir, seed=3)), 3)
    _assert_same_batches(_take(iter(_photo_loader(tiny_dir, seed=3)), 3), first)
    other = _take(iter(_photo_loader(tiny_dir, seed=4)), 3)
    first_ids = np.concatenate([batch["label"] for batch in first])
    other_ids = np.concatenate([batch["label"] for batch in other])
    assert not np.array_equal(first_ids, other_ids)


def test_every_epoch_is_a_fresh_permutation(tiny_dir):
    batches_per_epoch = NUM_PHOTOS // 8
    batches = _take(iter(_photo_loader(tiny_dir)), 2 * batches_per_epoch)
    ids = np.concatenate([batch["label"] for batch in batches]).reshape(2, NUM_PHOTOS)
    for epoch_ids in ids:
        np.testing.assert_array_equal(np.sort(epoch_ids), np.arange(NUM_PHOTOS))
    assert not np.array_equal(ids[0], ids[1])
    assert not np.array_equal(ids[0], np.sort(ids[0]))


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_read_disjoint_parts_that_cover_the_epoch(tiny_dir, process_count):
    per_process_ids = []
    for process_index in range(process_count):
        loader = _photo_loader(
            tiny_dir,
            per_process_batch_size=4,
            num_epochs=1,
            process_index=process_index,
            process_count=process_count,
        )
        per_process_ids.append(np.concatenate([batch["label"] for batch in loader]))
    sizes = [len(ids) for ids in per_process_ids]
    assert sizes == [NUM_PHOTOS // process_count] * process_count
    all_ids = np.concatenate(per_process_ids)
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(NUM_PHOTOS))


def test_resumed_iterator_continues_exactly(tiny_dir):
    # Resume mid-epoch, then run across the epoch boundary, with random flips on: the restored
    # state must reproduce the order, the reshuffle and the flips.
    make = lambda: _photo_loader(tiny_dir, seed=7, random_flip=True, center_crop=32)
    reference = iter(make())
    _take(reference, 4)
    state = reference.get_state()
    expected = _take(reference, 5)

    resumed = iter(make())
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), expected)
    # A fresh iterator starts over instead, so the check above can tell the two apart.
    fresh_ids = next(iter(make()))["label"]
    assert not np.array_equal(fresh_ids, expected[0]["label"])


def _global_loader(tiny_dir, **kwargs):
    kwargs = {"global_batch_size": 8, "read_options": FAST_READS, "seed": 7, **kwargs}
    return data.create_global_loader("tiny_photos", split="train", data_dir=tiny_dir, **kwargs)


def test_global_stream_is_the_same_on_any_topology_and_resumes_from_a_position(tiny_dir):
    """The training stream: on one process it is create_loader's; split by rows over any
    number of processes it reassembles into the same global batches; started at position
    k * G it continues exactly where batch k would have (across the epoch boundary, flips on)."""
    flips = {"random_flip": True, "center_crop": 32}
    # 8 batches of 8 from 48 photos: into the second epoch.
    whole = _take(iter(_global_loader(tiny_dir, rows=range(8), **flips)), 8)
    one_process = _take(iter(_photo_loader(tiny_dir, seed=7, **flips)), 8)
    _assert_same_batches(whole, one_process)
    for split in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]]):
        parts = [_take(iter(_global_loader(tiny_dir, rows=rows, **flips)), 8) for rows in split]
        for k, batch in enumerate(whole):
            for key in batch:
                reassembled = np.empty_like(batch[key])
                for rows, part in zip(split, parts, strict=True):
                    reassembled[rows] = part[k][key]
                np.testing.assert_array_equal(reassembled, batch[key])
    resumed = _take(iter(_global_loader(tiny_dir, rows=range(8), start=4 * 8, **flips)), 4)
    _assert_same_batches(resumed, whole[4:])


def test_resumed_digit_iterator_continues_exactly(digits_dir):
    make = lambda: data.create_loader(
        data_dir=digits_dir, per_process_batch_size=16, seed=1, read_options=FAST_READS
    )
    reference = iter(make())
    _take(reference, 3)
    state = reference.get_state()
    resumed = iter(make())
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), _take(reference, 2))


# --- Preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "channels"), [(40, 48, 3), (130, 200, 3), (200, 129, 1), (32, 32, 3)]
)
def test_adm_center_crop_matches_guided_diffusion(height, width, channels):
    image = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    expected = adm_center_crop_reference(pil_image, 32).reshape(32, 32, channels)
    np.testing.assert_array_equal(data.adm_center_crop(image, 32), expected)


def test_generic_loader_center_crops_png_images(tiny_dir):
    batch = next(iter(_photo_loader(tiny_dir, center_crop=32)))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    for image, photo_id in zip(batch["image"], batch["label"], strict=True):
        expected = adm_center_crop_reference(Image.fromarray(_photo(int(photo_id))), 32)
        np.testing.assert_allclose(image, expected / 127.5 - 1.0, atol=1e-6)


def test_flip_off_keeps_images_flip_on_mirrors_about_half(tiny_dir):
    num_batches = 2 * NUM_PHOTOS // 8
    plain = _take(iter(_photo_loader(tiny_dir, center_crop=32, seed=5)), num_batches)
    flipped = _take(
        iter(_photo_loader(tiny_dir, center_crop=32, seed=5, random_flip=True)), num_batches
    )
    num_mirrored = 0
    for plain_batch, flipped_batch in zip(plain, flipped, strict=True):
        np.testing.assert_array_equal(plain_batch["label"], flipped_batch["label"])
        for plain_image, photo_id, image in zip(
            plain_batch["image"], plain_batch["label"], flipped_batch["image"], strict=True
        ):
            original = adm_center_crop_reference(Image.fromarray(_photo(int(photo_id))), 32)
            np.testing.assert_allclose(plain_image, original / 127.5 - 1.0, atol=1e-6)
            if np.array_equal(image, plain_image):
                continue
            np.testing.assert_array_equal(image, plain_image[:, ::-1])
            num_mirrored += 1
    num_images = num_batches * 8
    assert 0.3 * num_images < num_mirrored < 0.7 * num_images


def test_unconditional_latents_under_another_key(tiny_dir):
    loader = data.create_loader(
        "tiny_latents",
        data_dir=tiny_dir,
        per_process_batch_size=4,
        image_key="latent",
        label_key=None,
        shuffle=False,
        num_epochs=1,
        read_options=FAST_READS,
    )
    batches = list(loader)
    assert len(batches) == 4 and all(batch.keys() == {"image"} for batch in batches)
    assert batches[0]["image"].shape == (4, *LATENT_SHAPE)
    assert batches[0]["image"].dtype == np.float32
    # Latents are not rescaled like pixels.
    values = np.concatenate([batch["image"][:, 0, 0, 0] for batch in batches])
    np.testing.assert_array_equal(np.sort(values), np.arange(16) - 0.5)


# --- Global arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh_shape", "axis_names"), [((8,), ("data",)), ((4, 2), ("data", "fsdp"))]
)
def test_make_global_batch_shards_over_the_mesh(mesh_shape, axis_names):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axis_names)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((16, 32, 32, 1)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    global_batch = data.make_global_batch(batch, mesh)
    for key, array in global_batch.items():
        assert isinstance(array, jax.Array) and array.shape == batch[key].shape
        assert array.sharding.spec == PartitionSpec(axis_names)
        np.testing.assert_array_equal(np.asarray(array), batch[key])
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start)
        assert len(shards) == 8
        for device_index, shard in enumerate(shards):
            np.testing.assert_array_equal(
                shard.data, batch[key][2 * device_index : 2 * device_index + 2]
            )


def test_make_global_batch_names_both_numbers_on_mismatch():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with pytest.raises(ValueError, match=r"12 .* not divisible by the 8 batch shards"):
        data.make_global_batch({"label": np.zeros(12, np.int32)}, mesh)


# --- Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet2012", "lsun/church_outdoor", "no_such_dataset"])
def test_unprepared_dataset_error_names_dataset_dir_and_fix(tmp_path, name):
    with pytest.raises(data.DatasetNotPreparedError) as raised:
        data.create_loader(name, data_dir=tmp_path, per_process_batch_size=8)
    message = str(raised.value)
    assert name in message and str(tmp_path) in message
    assert "tfds build" in message and "array_record" in message
    # Nothing was downloaded or prepared.
    assert not (tmp_path / "downloads").exists()


def test_corrupt_record_error_names_the_record(tiny_dir, tmp_path):
    corrupt_dir = tmp_path / "corrupt"
    shutil.copytree(tiny_dir / "tiny_photos", corrupt_dir / "tiny_photos")
    (record_file,) = (corrupt_dir / "tiny_photos" / "1.0.0").glob("*.array_record-*")
    payload = bytearray(record_file.read_bytes())
    middle = len(payload) // 2
    payload[middle : middle + 64] = bytes(64)
    record_file.write_bytes(bytes(payload))

    raw = data.open_data_source("tiny_photos", split="train", data_dir=corrupt_dir)
    bad_records = []
    for index in range(len(raw)):
        try:
            raw[index]
        except Exception:  # Any failure marks the record as corrupt.
            bad_records.append(index)
    assert bad_records, "the corruption should break at least one record"

    loader = data.create_loader(
        "tiny_photos",
        data_dir=corrupt_dir,
        per_process_batch_size=4,
        shuffle=False,
        num_epochs=1,
        read_options=FAST_READS,
    )
    with pytest.raises(data.CorruptRecordError, match=rf"Record {bad_records[0]} "):
        list(loader)


def test_wrong_feature_key_lists_the_features(tiny_dir):
    with pytest.raises(KeyError, match=r"no feature \['latent'\].*\['image', 'label'\]"):
        _photo_loader(tiny_dir, image_key="latent")


def test_batch_size_errors_name_the_numbers(tiny_dir):
    with pytest.raises(ValueError, match=r"global_batch_size=10 .* process_count=4"):
        data.per_process_batch_size(10, process_count=4)
    assert data.per_process_batch_size(256, process_count=4) == 64
    with pytest.raises(ValueError, match="24 of 48 records, fewer than per_process_batch_size=32"):
        _photo_loader(tiny_dir, per_process_batch_size=32, process_index=0, process_count=2)


def test_concurrent_preparation_builds_once(tmp_path):
    """Processes of one job (or test subprocesses) may all find the dataset missing at once."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "from diffussm_jax.data import embedded_digits as e; "
        f"print(e.prepare_embedded_digits({str(tmp_path)!r}).info.splits['train'].num_examples)"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=repo, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0]
    assert [output.strip().splitlines()[-1] for output in outputs] == ["5000"] * 3
