"""The Flax AutoencoderKL against diffusers' PyTorch one, weight loading, and its errors.

Reference tests randomly initialise diffusers' AutoencoderKL (then perturb every parameter, so
GroupNorm scales and biases are not the trivial 1 / 0), `save_pretrained` it, load the directory
with `vae.load` and compare encoder moments and decoder outputs:
  float64 (tiny config): max abs difference < 1e-12 (measured 6e-15; outputs of scale ~1);
  float32, tiny config: < 2e-5 (measured 3e-6); float32, the real SD KL-f8 shapes (83.7M
  parameters) at 32x32 pixels: < 5e-5 (measured 1.2e-5 on the decoder output, 1.3e-6 on moments).
They skip only where torch / diffusers are not installed (the `reference` extra).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from diffussm_jax import vae

TINY = vae.VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8)


def _torch_vae(config: vae.VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL of `config` with every parameter randomly perturbed."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        **{k: v for k, v in vae.weights.config_to_diffusers(config).items() if k[0] != "_"}
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 1:  # GroupNorm scale
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape)


def _torch_outputs(model, images_nhwc: np.ndarray, latents_nhwc: np.ndarray, dtype):
    torch = pytest.importorskip("torch")
    model = model.to(dtype)
    with torch.no_grad():
        x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)).to(dtype)
        dist = model.encode(x).latent_dist
        z = torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2)).to(dtype)
        decoded = model.decode(z).sample
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return to_nhwc(dist.mean), to_nhwc(dist.logvar), to_nhwc(decoded)


def _flax_outputs(model, params, images, latents):
    variables = {"params": params}
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, images)
    decoded = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))(variables, latents)
    return np.asarray(mean), np.asarray(logvar), np.asarray(decoded)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved diffusers tiny VAE: (directory, torch model)."""
    model = _torch_vae(TINY)
    directory = tmp_path_factory.mktemp("tiny_vae")
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory), model


def test_key_map_covers_the_architecture():
    for config in (TINY, vae.SD_KL_F8):
        shapes = vae.param_shapes(config)
        flax_paths = {
            tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(shapes)
        }
        mapped = [path for path, _ in vae.key_map(config).values()]
        assert len(mapped) == len(set(mapped)) == len(flax_paths)
        assert set(mapped) == flax_paths
    total = sum(x.size for x in jax.tree.leaves(vae.param_shapes(vae.SD_KL_F8)))
    assert total == 83_653_863  # diffusers' AutoencoderKL() / sd-vae-ft-ema


def test_shapes_and_downsampling():
    config = vae.VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    model = vae.AutoencoderKL(config)
    params = vae.param_shapes(config)
    images = jax.ShapeDtypeStruct((2, 24, 40, 3), jnp.float32)
    mean, logvar = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, method=model.encode), params, images
    )
    assert mean.shape == logvar.shape == (2, 3, 5, 4)
    out = jax.eval_shape(
        lambda p, z: model.apply({"params": p}, z, method=model.decode), params, mean
    )
    assert out.shape == (2, 24, 40, 3)


def test_matches_diffusers_float64(tiny_dir):
    directory, torch_model = tiny_dir
    torch = pytest.importorskip("torch")
    model, params = vae.load(directory)
    assert model.config == TINY
    images = _images((2, 32, 24, 3))
    latents = _images((2, 4, 3, 4), seed=1)
    expected = _torch_outputs(torch_model, images, latents, torch.float64)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        got = _flax_outputs(model, params64, jnp.asarray(images), jnp.asarray(latents))
    for name, want, have in zip(("mean", "logvar", "decoded"), expected, got, strict=True):
        assert have.dtype == np.float64 and have.shape == want.shape, name
        assert np.abs(want).max() > 0.1, name  # not a trivially small output
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-12, err_msg=name)


def test_matches_diffusers_float32(tiny_dir):
    directory, torch_model = tiny_dir
    torch = pytest.importorskip("torch")
    model, params = vae.load(directory)
    images = _images((2, 16, 16, 3)).astype(np.float32)
    latents = _images((2, 2, 2, 4), seed=1).astype(np.float32)
    expected = _torch_outputs(torch_model, images, latents, torch.float32)
    got = _flax_outputs(model, params, images, latents)
    for name, want, have in zip(("mean", "logvar", "decoded"), expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=0, atol=2e-5, err_msg=name)


def test_real_sd_architecture_matches_diffusers(tmp_path):
    """The 83.7M-parameter SD KL-f8 shapes, forward at 32x32 pixels (4x4 latents), float32."""
    torch = pytest.importorskip("torch")
    torch_model = _torch_vae(vae.SD_KL_F8, seed=1)
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, params = vae.load(tmp_path)
    assert model.config == vae.SD_KL_F8
    images = _images((1, 32, 32, 3), seed=2).astype(np.float32)
    latents = _images((1, 4, 4, 4), seed=3).astype(np.float32)
    expected = _torch_outputs(torch_model, images, latents, torch.float32)
    got = _flax_outputs(model, params, images, latents)
    for name, want, have in zip(("mean", "logvar", "decoded"), expected, got, strict=True):
        assert have.shape == want.shape, name
        np.testing.assert_allclose(have, want, rtol=0, atol=5e-5, err_msg=name)


def test_save_roundtrip_loads_in_diffusers(tmp_path):
    params = vae.init_params(TINY, jax.random.key(3), image_size=8)
    pytest.importorskip("safetensors")
    vae.save(tmp_path, TINY, params)
    model, loaded = vae.load(tmp_path)
    assert model.config == TINY
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))

    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    torch_model = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    latents = _images((1, 2, 2, 4)).astype(np.float32)
    with torch.no_grad():
        want = torch_model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    have = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(loaded, latents)
    np.testing.assert_allclose(np.asarray(have), want.numpy().transpose(0, 2, 3, 1), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Old checkpoints and errors (numpy state dicts; no torch needed)


@pytest.fixture(scope="module")
def tiny_state_dict():
    params = vae.init_params(TINY, jax.random.key(0), image_size=8)
    return vae.flax_to_state_dict(jax.device_get(params), TINY)


def test_legacy_attention_names_and_1x1_convs(tiny_state_dict):
    reference = vae.convert_state_dict(tiny_state_dict, TINY)
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in tiny_state_dict.items():
        for new, old in renames.items():
            marker = f"attentions.0.{new}."
            if marker in key:
                key = key.replace(marker, f"attentions.0.{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]  # stored as a 1x1 conv
        legacy[key] = value
    assert any(".query.weight" in key for key in legacy)
    converted = vae.convert_state_dict(legacy, TINY)
    jax.tree.map(np.testing.assert_array_equal, converted, reference)


def test_mismatched_keys_are_named(tiny_state_dict):
    broken = dict(tiny_state_dict)
    del broken["decoder.conv_out.bias"]
    broken["encoder.extra.weight"] = np.zeros(3, np.float32)
    broken["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    with pytest.raises(vae.VAEWeightsError) as info:
        vae.convert_state_dict(broken, TINY, source="test.safetensors")
    message = str(info.value)
    assert "1 missing keys" in message and "decoder.conv_out.bias" in message
    assert "1 unexpected keys" in message and "encoder.extra.weight" in message
    assert "1 mis-shaped keys" in message
    assert "encoder.conv_in.weight: (16, 3, 5, 5) in the file, (16, 3, 3, 3) expected" in message


def test_wrong_config_names_every_mismatch(tiny_state_dict):
    other = vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8)
    with pytest.raises(vae.VAEWeightsError) as info:
        vae.convert_state_dict(tiny_state_dict, other)
    message = str(info.value)
    assert "2 missing keys" in message and "46 unexpected keys" in message
    assert "22 mis-shaped keys" in message and "... and 10 more" in message


def test_nonfinite_and_compvis_layouts_are_refused(tiny_state_dict):
    broken = dict(tiny_state_dict)
    broken["quant_conv.bias"] = np.full_like(broken["quant_conv.bias"], np.nan)
    with pytest.raises(vae.VAEWeightsError, match=r"NaN or Inf.*\n.*quant_conv\.bias"):
        vae.convert_state_dict(broken, TINY)
    compvis = {"encoder.down.0.block.0.norm1.weight": np.ones(16, np.float32)}
    with pytest.raises(vae.VAEWeightsError, match="CompVis/LDM layout"):
        vae.convert_state_dict(compvis, TINY)


def test_missing_and_corrupt_files_are_explained(tmp_path, tiny_state_dict):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    with pytest.raises(vae.VAEWeightsNotFoundError, match=r"does not exist(.|\n)*sd-vae-ft-ema"):
        vae.load(tmp_path / "nowhere")

    directory = tmp_path / "vae"
    directory.mkdir()
    (directory / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(vae.VAEWeightsNotFoundError, match="pickled PyTorch files are not read"):
        vae.load(directory)

    weights = directory / "diffusion_pytorch_model.safetensors"
    safetensors_numpy.save_file(tiny_state_dict, str(weights))
    with pytest.raises(vae.VAEWeightsNotFoundError, match=r"config\.json does not exist"):
        vae.load(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(vae.VAEWeightsError, match="not valid JSON"):
        vae.load(directory)
    (directory / "config.json").write_text(json.dumps(vae.weights.config_to_diffusers(TINY)))
    vae.load(directory)  # the intact pair loads

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(vae.VAEWeightsError, match="truncated or corrupt"):
        vae.load(directory)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(vae.VAEWeightsError, match="truncated or corrupt"):
        vae.load(directory)
    os.remove(weights)
    with pytest.raises(vae.VAEWeightsNotFoundError, match="safetensors does not exist"):
        vae.load(directory)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)])
def test_half_precision_files_load_upcast_and_logged(tmp_path, tiny_state_dict, dtype, caplog):
    """fp16 / bf16 safetensors (as often published) load as their exact float32 upcast, with a
    log line saying so; a half-precision file cut short is still reported as corrupt."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    half = {key: value.astype(dtype) for key, value in tiny_state_dict.items()}
    # The rounding is real, so loading the float32 original instead would fail the check below.
    assert any(not np.array_equal(half[k], tiny_state_dict[k]) for k in half)
    directory = tmp_path / "vae"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(vae.weights.config_to_diffusers(TINY)))
    weights = directory / vae.weights.WEIGHTS_NAME
    safetensors_numpy.save_file(half, str(weights))

    with caplog.at_level(logging.INFO, logger="absl"):
        _, params = vae.load(directory)
    upcast = vae.convert_state_dict({k: v.astype(np.float32) for k, v in half.items()}, TINY)
    for loaded, expected in zip(jax.tree.leaves(params), jax.tree.leaves(upcast), strict=True):
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, expected)
    assert f"{len(half)} tensors in {dtype.name}; upcast to float32" in caplog.text

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(vae.VAEWeightsError, match="truncated or corrupt"):
        vae.load(directory)
    safetensors_numpy.save_file({"quant_conv.bias": np.arange(8, dtype=np.int32)}, str(weights))
    with pytest.raises(vae.VAEWeightsError, match=r"dtype \['I32'\].*floating point"):
        vae.load(directory)


def test_unported_architectures_are_refused():
    with pytest.raises(vae.VAEWeightsError, match="act_fn"):
        vae.config_from_diffusers({"act_fn": "gelu", "block_out_channels": [32]})
    with pytest.raises(vae.VAEWeightsError, match="down_block_types"):
        vae.config_from_diffusers(
            {"block_out_channels": [32], "down_block_types": ["AttnDownEncoderBlock2D"]}
        )
    with pytest.raises(vae.VAEWeightsError, match="AutoencoderKL"):
        vae.config_from_diffusers({"_class_name": "AutoencoderTiny"})
