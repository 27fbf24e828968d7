"""Latent extraction with a tiny random VAE on generated images, then training and sampling from it.

System level: extract -> check every record against a direct VAE encoding -> interrupt and
resume (and split over two simulated processes) -> identical dataset -> train a few steps of
the smoke model on the latents -> sample -> decode through the VAE.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import imagenet256
from diffussm_jax import data, inference, sampling, training, vae
from diffussm_jax.data import latents

pytest.importorskip("safetensors")  # the VAE files are safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Downsample factor 8 like SD's, tiny widths: 64px images -> (8, 8, 4) latents.
TINY = vae.VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
RESOLUTION = 64
NUM_IMAGES = 10
PER_SHARD = 3  # 4 shards: 3 + 3 + 3 + 1 images


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    vae_dir = root / "vae"
    params = vae.init_params(TINY, jax.random.key(0), image_size=8)
    vae.save(vae_dir, TINY, params)
    rng = np.random.default_rng(0)
    folder = root / "images"
    for index in range(NUM_IMAGES):
        height, width = rng.integers(40, 120, 2)
        mode = ("RGB", "L", "RGBA")[index % 3]
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        class_dir = folder / ("cats" if index % 2 else "dogs")
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"{index:03d}.png")
    return {
        "root": root,
        "vae": str(vae_dir),
        "folder": str(folder),
        "data_dir": str(root / "tfds"),
    }


def _extract(workspace, name, **kwargs):
    return latents.extract_latents(
        source=f"folder:{workspace['folder']}",
        vae_path=workspace["vae"],
        resolution=RESOLUTION,
        output_name=name,
        output_data_dir=workspace["data_dir"],
        images_per_shard=PER_SHARD,
        batch_size=2,
        progress=False,
        **kwargs,
    )


def _records(workspace, name):
    source = tfds.data_source(name, split="train", data_dir=workspace["data_dir"])
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def extracted(workspace):
    result = _extract(workspace, "toy_latents_64")
    assert result.complete and result.written == [0, 1, 2, 3] and not result.skipped
    return _records(workspace, "toy_latents_64")


def test_records_are_vae_means_of_cropped_images_and_their_mirrors(workspace, extracted):
    source = latents.open_image_source(f"folder:{workspace['folder']}")
    assert source.num_classes == 2 and len(extracted) == 2 * NUM_IMAGES
    model, params = vae.load(workspace["vae"])
    images = np.stack([latents.prepare_image(source.read(i)[0], RESOLUTION) for i in range(10)])
    encode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode)[0])
    pixels = images.astype(np.float32) / 127.5 - 1
    means = np.asarray(encode(pixels))
    mirrored = np.asarray(encode(pixels[:, :, ::-1]))
    assert not np.allclose(means[:, :, ::-1], mirrored, atol=1e-3)  # flips must be encoded
    for i in range(NUM_IMAGES):
        plain, flipped = extracted[2 * i], extracted[2 * i + 1]
        assert plain["index"] == flipped["index"] == i
        assert not plain["flipped"] and flipped["flipped"]
        assert plain["label"] == flipped["label"] == source.read(i)[1]
        assert plain["latent"].shape == (8, 8, 4) and plain["latent"].dtype == np.float32
        np.testing.assert_allclose(plain["latent"], means[i], atol=1e-5)
        np.testing.assert_allclose(flipped["latent"], mirrored[i], atol=1e-5)


def _assert_same(records, expected):
    assert len(records) == len(expected)
    for record, reference in zip(records, expected, strict=True):
        assert sorted(record) == sorted(reference)
        for key in record:
            np.testing.assert_array_equal(record[key], reference[key])


def test_interrupted_extraction_resumes_to_the_same_dataset(workspace, extracted):
    name = "toy_resumed_latents_64"
    first = _extract(workspace, name, max_shards=1)
    assert first.written == [0] and not first.complete
    with pytest.raises(data.DatasetNotPreparedError):
        data.open_data_source(name, split="train", data_dir=workspace["data_dir"])
    # A write killed half way leaves a temporary file; it must neither count nor survive.
    stale = latents.shard_path(first.version_dir, name, "train", 1, 4) + ".tmp-99999"
    with open(stale, "wb") as f:
        f.write(b"partial")
    second = _extract(workspace, name, max_shards=2)
    assert second.skipped == [0] and second.written == [1, 2] and not second.complete
    third = _extract(workspace, name)
    assert third.skipped == [0, 1, 2] and third.written == [3] and third.complete
    assert not os.path.exists(stale)
    _assert_same(_records(workspace, name), extracted)


def test_processes_write_disjoint_shards(workspace, extracted):
    name = "toy_two_process_latents_64"
    second = _extract(workspace, name, process_index=1, process_count=2)
    assert second.written == [1, 3] and not second.complete
    first = _extract(workspace, name, process_index=0, process_count=2)
    assert first.written == [0, 2] and first.complete
    _assert_same(_records(workspace, name), extracted)


def test_changed_settings_are_refused(workspace, extracted):
    del extracted  # toy_latents_64 exists
    with pytest.raises(ValueError, match=r"other settings.*images_per_shard"):
        latents.extract_latents(
            source=f"folder:{workspace['folder']}",
            vae_path=workspace["vae"],
            resolution=RESOLUTION,
            output_name="toy_latents_64",
            output_data_dir=workspace["data_dir"],
            images_per_shard=5,
            progress=False,
        )


def test_bad_inputs_are_explained(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="No images"):
        latents.open_image_source(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="multiple of the VAE's downsample factor 8"):
        latents.extract_latents(
            source=f"folder:{workspace['folder']}", vae_path=workspace["vae"], resolution=60
        )
    gray = latents.prepare_image(np.zeros((30, 50), np.uint8), 16)
    rgba = latents.prepare_image(np.zeros((50, 30, 4), np.uint8), 16)
    assert gray.shape == rgba.shape == (16, 16, 3)
    assert (
        latents.default_output_name("lsun/church_outdoor", 256) == "lsun_church_outdoor_latents_256"
    )


def latent_config(workspace):
    """configs/imagenet256.py:smoke pointed at the toy latents (8x8x4, two classes)."""
    config = imagenet256.get_config("smoke")
    with config.unlocked():
        config.data.name = "toy_latents_64"
        config.data.data_dir = workspace["data_dir"]
        config.data.image_size = RESOLUTION // 8
        config.vae.path = workspace["vae"]
        config.num_train_steps = 3
        config.checkpoint_every_steps = 3
        config.log_every_steps = 1
        config.sample_every_steps = 0
        config.sampling.steps = 2
    return config


def test_train_on_latents_then_sample_and_decode(workspace, extracted, tmp_path):
    del extracted
    workdir = str(tmp_path / "run")
    config = latent_config(workspace)
    state = training.train(config, workdir)
    assert int(state.step) == 3

    paths = inference.sample_to_npz(
        workdir, str(tmp_path / "samples.npz"), num_samples=5, labels=[0, 1], steps=2
    )
    with np.load(paths["npz"], allow_pickle=False) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 0, 1, 0])
    assert images.std() > 0

    # The decoded samples are the VAE decoding of the sampled latents / latent_scale.
    saved = inference.load_config(workdir)
    experiment = training.setup(saved, for_training=False)
    model, mesh = experiment.model, experiment.mesh
    params, _ = inference.restore_ema_params(experiment, workdir)
    # The settings sample_to_npz used, so the compiled sampler comes from the persistent cache.
    kwargs = dict(sampler=saved.sampling.sampler, steps=2, cfg_scale=saved.sampling.cfg_scale)
    diffusion = training.create_diffusion(saved)
    decoder = training.latent_decoder(saved)
    plain = sampling.make_sample_fn(model, diffusion, mesh, **kwargs)
    decoded = sampling.make_sample_fn(model, diffusion, mesh, decoder=decoder, **kwargs)
    rng, labels = jax.random.key(7), np.array([0, 1, 1], np.int32)
    sampled_latents = sampling.draw(plain, params, rng, labels, mesh)
    assert sampled_latents.shape == (3, 8, 8, 4)
    got = sampling.draw(decoded, params, rng, labels, mesh)
    vae_model, vae_params = vae.load(workspace["vae"])
    want = vae_model.apply(
        {"params": vae_params}, jnp.asarray(sampled_latents / 0.18215), method=vae_model.decode
    )
    np.testing.assert_allclose(got, np.clip(np.asarray(want), -1, 1), atol=1e-5)


def test_latent_configs_and_smoke_variants():
    from configs import imagenet512, lsun

    big = imagenet512.get_config()
    assert big.data.name == "imagenet2012_latents_512" and big.data.image_size == 64
    assert big.num_train_steps == 1_180_000 and not big.data.random_flip
    assert imagenet512.get_config("smoke").num_train_steps == 20
    church = lsun.get_config("smoke")
    assert church.data.name == "lsun_church_outdoor_latents_256" and church.data.label_key is None
    assert church.model.hidden_size == 32 and church.vae.path == imagenet256.VAE_PATH
    assert latents.default_output_name("imagenet2012", 512) == big.data.name


def test_latent_config_without_vae_is_explained(workspace):
    config = latent_config(workspace)
    with config.unlocked():
        config.vae.path = None
    with pytest.raises(ValueError, match=r"--config\.vae\.path"):
        training.latent_decoder(config)
    with config.unlocked():
        config.data.channels = 3
    with pytest.raises(ValueError, match="4 latent channels"):
        training.latent_decoder(config, workspace["vae"])


def test_launcher_on_embedded_digits(workspace):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a laptop
    data_dir = workspace["data_dir"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.extract_latents",
            "--source=embedded_digits",
            f"--data_dir={data_dir}",
            f"--vae={workspace['vae']}",
            "--resolution=32",
            "--max_images=6",
            "--images_per_shard=4",
            "--batch_size=3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "complete; wrote 2 shards" in result.stdout
    loader = data.create_loader(
        "embedded_digits_latents_32",
        data_dir=data_dir,
        per_process_batch_size=4,
        image_key="latent",
        process_index=0,
        process_count=1,
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 4, 4, 4) and batch["image"].dtype == np.float32
    assert set(batch["label"]) <= set(range(10))
