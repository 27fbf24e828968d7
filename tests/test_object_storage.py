"""Runs whose files live in a bucket, on real local storage servers started here: a GCS
emulator (fake-gcs-server) and moto's S3 server.

The kill -9 resume test with its workdir in a bucket is in test_reliability.py; this file covers
the path layer (`diffussm_jax.files`, on both servers) and the rest of a run's files on GCS:
training with periodic sample grids and plots, milestone checkpoints, sampling and evaluating a
given step, the digits classifier cache, VAE weights and extracted latents, all in the bucket.
On S3, everything but checkpoints: orbax writes those to local paths and gs:// only, and a
training run with an s3:// workdir is refused with the ways out.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import numpy as np
import pytest
import storage_server
from PIL import Image

from configs import quickstart
from diffussm_jax import data, files, inference, training, vae
from diffussm_jax.data import latents
from diffussm_jax.evaluation import digits
from diffussm_jax.inference import score as run_evaluation
from diffussm_jax.training import checkpoint, metric_logging, plots


@contextlib.contextmanager
def _serving(server_class, log_path):
    """Starts a server and points clients at it through the environment; stops it after."""
    server = server_class(str(log_path))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in server.env.items():
                patch.setenv(name, value)
            yield
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """`gs://` + the bucket of a fresh fake-gcs-server for this module."""
    with _serving(storage_server.FakeGCS, tmp_path_factory.mktemp("gcs") / "server.log"):
        yield f"gs://{storage_server.BUCKET}"


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    """`s3://` + the bucket of a fresh moto S3 server for this module."""
    with _serving(storage_server.MotoS3, tmp_path_factory.mktemp("s3") / "server.log"):
        yield f"s3://{storage_server.BUCKET}"


@pytest.mark.parametrize("store", ["bucket", "s3_bucket"])
def test_path_layer_writes_reads_and_moves_objects(store, request, tmp_path):
    bucket = request.getfixturevalue(store)
    base = files.join(bucket, "layer")
    assert files.join(bucket, "a/", "/b") == f"{bucket}/a/b" and files.is_remote(base)
    assert files.resolve(f"{base}/") == base and files.resolve("x") == os.path.abspath("x")

    text = files.join(base, "config.json")
    files.write_atomically(text, '{"a": 1}')
    files.write_atomically(text, '{"a": 2}')  # replaces the object whole
    assert json.loads(files.read_text(text)) == {"a": 2}
    assert files.listdir(base) == ["config.json"] and files.isdir(base)
    assert files.listdir(files.join(base, "absent")) == []  # a prefix without objects

    # No append on object storage: the writer's copy of the lines is uploaded whole.
    lines = files.join(base, "metrics.jsonl")
    cache: list[str] = []
    files.append_lines(lines, ["1"], cache=cache)
    files.append_lines(lines, ["2", "3"], cache=cache)
    files.append_lines(lines, ["4"])  # without a copy: read back, then rewritten
    assert files.read_text(lines) == "1\n2\n3\n4\n"

    arrays = {"images": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "labels": np.arange(2)}
    npz = files.join(base, "shards", "batch_000000.npz")
    files.save_npz(npz, **arrays)
    loaded = files.load_npz(npz)
    assert sorted(loaded) == ["images", "labels"]
    np.testing.assert_array_equal(loaded["images"], arrays["images"])

    local = files.local_temporary(files.join(base, "big.npz"))
    with open(local, "wb") as f:
        f.write(b"built locally")
    files.publish(local, files.join(base, "big.npz"))
    assert files.read_bytes(files.join(base, "big.npz")) == b"built locally"
    assert not os.path.exists(local)

    files.rename(files.join(base, "shards"), files.join(base, "moved", "shards"))
    assert not files.exists(npz)
    assert files.listdir(files.join(base, "moved", "shards")) == ["batch_000000.npz"]
    files.remove_tree(files.join(base, "moved"))
    assert "moved" not in files.listdir(base)


def test_half_written_steps_are_the_uncommitted_ones(bucket):
    """Object storage has no rename: a step is complete once its commit file exists."""
    directory = files.join(bucket, "half", "checkpoints")
    files.write_atomically(files.join(directory, "2", checkpoint.COMMIT_FILE), "ok")
    files.write_atomically(files.join(directory, "2", "state", "x"), "data")
    files.write_atomically(files.join(directory, "4", "state", "x"), "data")  # killed mid-write
    assert checkpoint.half_written(directory) == ["4"]


def test_train_sample_and_evaluate_with_every_file_in_a_bucket(bucket, tmp_path, monkeypatch):
    """A run with its workdir in the bucket writes its config, metrics, TensorBoard events,
    sample grid, plot and milestone checkpoints there; sampling and evaluating a milestone
    read them back and write their outputs there too."""
    workdir = files.join(bucket, "run")
    config = quickstart.get_config("smoke")
    with config.unlocked():
        config.data.data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
        config.num_train_steps = 4
        config.checkpoint_every_steps = 4
        config.keep_checkpoints = 1
        config.keep_every_steps = 2
        config.log_every_steps = 2
        config.sample_every_steps = 4
        config.sampling.steps = 2
    # A new TensorBoard event file per write (100 in real runs) keeps each upload small.
    monkeypatch.setattr(metric_logging.MetricWriter, "EVENTS_PER_FILE_REMOTE", 1)
    training.train(config, workdir)

    names = files.listdir(workdir)
    for expected in ("checkpoints", "config.json", "metrics.jsonl", "plots", "samples", "tb"):
        assert expected in names, names
    records = [
        json.loads(line) for line in files.read_text(f"{workdir}/metrics.jsonl").splitlines()
    ]
    # Training metrics at steps 2 and 4, then the step-4 sample grid's digits accuracy.
    assert [(r["step"], "loss" in r) for r in records] == [(2, True), (4, True), (4, False)]
    events = files.listdir(f"{workdir}/tb")
    assert len(events) == 4 and all(".tfevents." in name for name in events), events
    assert files.listdir(f"{workdir}/samples") == ["latest.json", "step_0000004.png"]
    steps = [name for name in files.listdir(f"{workdir}/checkpoints") if name.isdigit()]
    assert sorted(steps, key=int) == ["2", "4"]  # the milestone survived keep_checkpoints=1
    assert plots.read_metrics(plots.metrics_path(workdir))["loss"][0].tolist() == [2, 4]

    output = files.join(bucket, "samples", "milestone.npz")
    paths = inference.sample_to_npz(workdir, output, num_samples=4, checkpoint_step=2)
    assert paths["png"] == files.join(bucket, "samples", "milestone.png")
    assert json.loads(str(files.load_npz(output)["meta"]))["step"] == 2

    result = run_evaluation.evaluate(workdir, num_samples=8, checkpoint_step=2, labels="balanced")
    assert result["step"] == 2 and result["samples"].startswith(f"{workdir}/eval/")
    assert files.exists(result["samples"]) and files.exists(result["scores"])
    shards = [name for name in files.listdir(f"{workdir}/eval") if name.endswith(".shards")]
    assert files.listdir(f"{workdir}/eval/{shards[0]}") == [
        "batch_000000.npz",
        run_evaluation.MANIFEST,
    ]


def test_digits_classifier_cache_and_vae_weights_in_a_bucket(bucket):
    """The classifier cache, when pointed at a bucket, is written and used from there (no
    retraining); VAE weights saved to a bucket load back exactly."""
    params = digits._MODEL.init(jax.random.key(0), np.zeros((1, *digits.IMAGE_SHAPE)))["params"]
    cache = files.join(bucket, "cache", digits.CACHE_FILENAME)
    digits.save_classifier(cache, params, 0.25, digits.ClassifierConfig())
    evaluator = digits.load_or_train_classifier(cache_path=cache)
    assert evaluator.test_accuracy == pytest.approx(0.25)  # loaded, not retrained (~0.99)
    assert_trees_equal(evaluator.params, params)

    config = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    weights = jax.device_get(vae.init_params(config, jax.random.key(0), image_size=8))
    directory = files.join(bucket, "vae")
    vae.save(directory, config, weights)
    _, restored = vae.load(directory)
    assert_trees_equal(restored, weights)


def assert_trees_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_latents_extracted_into_a_bucket_match_a_local_extraction(bucket, tmp_path):
    """Shards are built locally and uploaded whole; the dataset copied down reads back the
    same records as one extracted to local disk, and a bucket data_dir for training is
    refused with the way out (array_record reads local or mounted files)."""
    tiny = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae_dir = files.join(bucket, "latents", "vae")  # the VAE is read from the bucket too
    vae.save(vae_dir, tiny, vae.init_params(tiny, jax.random.key(0), image_size=8))
    rng = np.random.default_rng(0)
    for index in range(5):
        (tmp_path / "images" / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"class{index % 2}" / f"{index}.png")

    def extract(output_data_dir: str):
        return latents.extract_latents(
            source=f"folder:{tmp_path / 'images'}",
            vae_path=vae_dir,
            resolution=16,
            output_name="toy_latents_16",
            output_data_dir=output_data_dir,
            images_per_shard=2,
            batch_size=2,
            progress=False,
        )

    remote = extract(files.join(bucket, "tfds"))
    local = extract(str(tmp_path / "local_tfds"))
    assert remote.complete and remote.written == [0, 1, 2]
    copied = tmp_path / "copied_tfds" / "toy_latents_16" / latents.VERSION
    copied.mkdir(parents=True)
    for name in files.listdir(remote.version_dir):
        (copied / name).write_bytes(files.read_bytes(files.join(remote.version_dir, name)))
    assert sorted(os.listdir(copied)) == sorted(os.listdir(local.version_dir))

    def records(data_dir):
        source = data.open_data_source("toy_latents_16", split="train", data_dir=data_dir)
        return [source[i] for i in range(len(source))]

    expected = records(str(tmp_path / "local_tfds"))
    assert len(expected) == 10
    for got, want in zip(records(str(tmp_path / "copied_tfds")), expected, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match=r"is a bucket.*gcloud storage cp -r.*gcsfuse"):
        data.open_data_source("toy_latents_16", split="train", data_dir=files.join(bucket, "tfds"))


def test_s3_holds_samples_but_a_training_workdir_there_is_refused(s3_bucket, tmp_path):
    """Sampling a local run writes its .npz and grid to S3; `--workdir=s3://...` for training
    names the fixes (orbax, the checkpoint library, writes to gs:// and local paths only)."""
    workdir = str(tmp_path / "run")
    config = quickstart.get_config("smoke")
    with config.unlocked():
        config.data.data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
        config.num_train_steps = 2
        config.checkpoint_every_steps = 2
    training.train(config, workdir)
    output = files.join(s3_bucket, "samples", "run.npz")
    paths = inference.sample_to_npz(workdir, output, num_samples=4, steps=2)
    assert paths["png"] == files.join(s3_bucket, "samples", "run.png")
    assert files.load_npz(output)["arr_0"].shape == (4, 16, 16, 1)
    with pytest.raises(ValueError, match=r"s3://.*gs://.*mount"):
        training.train(config, files.join(s3_bucket, "run"))
