"""The Flax FID Inception against pytorch-fid's network, the converter, and weight-file errors.

pytorch-fid's `fid_inception_v3()` downloads the real weights, so the reference network is built
here from the same pieces (torchvision's Inception-V3 with pytorch-fid's FIDInceptionA/C/E_1/E_2
blocks, 1008 classes, no aux head) with random weights, while every network path is blocked.
Its BatchNorm scales and biases are random and its running statistics are those of a random
batch, so activations stay O(1) through all 94 BatchNorm layers (neither exploding nor
vanishing) while every mean, variance, scale and bias differs from the identity. Both
networks run on the same uint8 images; the PyTorch network also runs in float64, the ground
truth for both float32 runs.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffussm_jax.evaluation import inception, metrics

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
F = torch.nn.functional
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Agreement with the float64 PyTorch network: max |error| / max |output|, per output.
# Measured (2 random images, 64px -> 299, this CPU): JAX float32 errs by 0.6-1.2e-5 (pool 9.4e-6,
# mixed_6 1.2e-5, logits 5.7e-6), PyTorch's own float32 run by 2.5-5.6e-5. 5e-5 is PyTorch's
# float32 accuracy; a wrong layer, padding, pool or BatchNorm term gives errors of order 1.
RELATIVE_TOLERANCE = 5e-5


class _NoNetwork:
    """Fails any attempt to open a connection or fetch weights while building the reference."""

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()

        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted while building the reference net")

        self.patch.setattr(socket.socket, "connect", refuse)
        self.patch.setattr(socket, "create_connection", refuse)
        self.patch.setattr(pytorch_fid_inception, "load_state_dict_from_url", refuse)
        self.patch.setattr(torch.hub, "load_state_dict_from_url", refuse)
        return self

    def __exit__(self, *exc):
        self.patch.undo()


def _random_fid_inception(seed: int):
    """pytorch-fid's FID Inception structure (as `fid_inception_v3`) with random weights."""
    torch.manual_seed(seed)
    pf = pytorch_fid_inception
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
        net.fc.weight.normal_(0.0, 2048**-0.5)
        net.fc.bias.normal_(0.0, 0.5)
    return net


def _build_reference():
    """(pytorch-fid wrapper, raw net, its state dict) with calibrated, perturbed BN stats."""
    with _NoNetwork():
        net = _random_fid_inception(seed=0)
        original = pytorch_fid_inception.fid_inception_v3
        pytorch_fid_inception.fid_inception_v3 = lambda: net
        try:
            wrapper = pytorch_fid_inception.InceptionV3(
                [pytorch_fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX], use_fid_inception=True
            )
        finally:
            pytorch_fid_inception.fid_inception_v3 = original
    batchnorms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 0.2, generator=generator)
            # Running statistics = those of one random batch (momentum None: a plain average),
            # taken after the affine parameters are set so that every layer sees O(1) inputs.
            bn.reset_running_stats()
            bn.momentum = None
        wrapper.train()
        wrapper(torch.rand(4, 3, 80, 80, generator=generator))
    wrapper.eval()
    net.eval()
    return wrapper, net, {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    return _build_reference()


def _torch_outputs(wrapper, net, images: np.ndarray, dtype) -> dict[str, np.ndarray]:
    """pytorch-fid's forward on uint8 NHWC images (its input: [0, 1] NCHW) plus fc and mixed_6."""
    captured = {}

    def keep_output(module, args, output):
        captured["mixed_6"] = output  # returns None: the forward pass is left unchanged

    hook = net.Mixed_6d.branch1x1.register_forward_hook(keep_output)
    net.to(dtype)
    try:
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
            (pool,) = wrapper(x)
            pool = pool.flatten(1)
            outputs = {
                "pool": pool,
                "mixed_6": captured["mixed_6"].permute(0, 2, 3, 1),
                "logits": net.fc(pool),
                "adm_logits": pool @ net.fc.weight.T,
            }
    finally:
        hook.remove()
        net.to(torch.float32)
    return {name: value.numpy().astype(np.float64) for name, value in outputs.items()}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch_outputs(reference, images):
    wrapper, net, _ = reference
    return {
        "float64": _torch_outputs(wrapper, net, images, torch.float64),
        "float32": _torch_outputs(wrapper, net, images, torch.float32),
    }


@pytest.fixture(scope="module")
def converted(reference):
    return inception.convert_state_dict(reference[2])


@pytest.fixture(scope="module")
def jax_forward():
    """One jitted preprocess + forward, shared by the tests (the 299px compile is slow)."""
    model = inception.InceptionV3()
    return jax.jit(lambda variables, images: model.apply(variables, inception.preprocess(images)))


def _variables(flat):
    inception.check_variables(flat)
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _relative_error(got, want):
    return np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))


def test_matches_pytorch_fid(converted, jax_forward, images, torch_outputs):
    got = jax_forward(_variables(converted), images)
    truth = torch_outputs["float64"]
    assert got["mixed_6"].shape == (2, 17, 17, 192) and got["pool"].shape == (2, 2048)
    for name in ("pool", "mixed_6", "logits", "adm_logits"):
        scale = np.max(np.abs(truth[name]))
        # Activations neither vanished nor exploded, so the comparison means something.
        assert 0.1 < scale < 100, (name, scale)
        jax_error = _relative_error(got[name], truth[name])
        torch_error = _relative_error(torch_outputs["float32"][name], truth[name])
        assert jax_error < RELATIVE_TOLERANCE, (name, jax_error, torch_error)
    # The bias matters: logits and adm_logits differ by exactly fc.bias.
    np.testing.assert_allclose(
        got["logits"] - got["adm_logits"],
        np.broadcast_to(converted["params/fc/bias"], (2, 1008)),
        atol=1e-4,
    )


def test_preprocess_resize_matches_torch_interpolate():
    rng = np.random.default_rng(3)
    for height, width in ((64, 64), (512, 384), (299, 299), (7, 300)):
        image = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
        got = np.asarray(inception.preprocess(image))
        x = torch.from_numpy(image).permute(0, 3, 1, 2).double() / 255.0
        want = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)
    # Grey images are repeated to three channels.
    grey = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_array_equal(
        inception.preprocess(grey), inception.preprocess(np.repeat(grey, 3, axis=-1))
    )


def test_tf_graph_preprocessing_matches_numpy():
    """TF1 legacy bilinear resize of 0..255 values, then (x - 128) / 128, in float64."""
    image = np.random.default_rng(4).integers(0, 256, (1, 40, 23, 3), dtype=np.uint8)
    rows = inception.bilinear_resize_matrix(40, 299, "tf1")
    cols = inception.bilinear_resize_matrix(23, 299, "tf1")
    want = (np.einsum("oh,bhwc,pw->bopc", rows, image.astype(np.float64), cols) - 128) / 128
    got = np.asarray(inception.preprocess(image, mode="tf_graph"))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Pixel value 128 maps to 0 (pytorch-fid's 2 x / 255 - 1 maps 127.5 to 0).
    grey = np.full((1, 8, 8, 3), 128, np.uint8)
    np.testing.assert_array_equal(inception.preprocess(grey, mode="tf_graph"), 0.0)
    assert float(inception.preprocess(grey)[0, 0, 0, 0]) == pytest.approx(1 / 255, abs=1e-6)
    with pytest.raises(ValueError, match="tf_graph"):
        inception.preprocess(grey, mode="tf")


def test_tf1_resize_matrix_closed_form():
    # TF1 legacy (no half-pixel centres), 2 -> 4: source positions 0, 0.5, 1, 1.5 (clamped).
    np.testing.assert_allclose(
        inception.bilinear_resize_matrix(2, 4, "tf1"),
        [[1, 0], [0.5, 0.5], [0, 1], [0, 1]],
    )
    # PyTorch half-pixel, 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25.
    np.testing.assert_allclose(
        inception.bilinear_resize_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]
    )
    # Rows are convex combinations for any sizes.
    for mode in ("pytorch", "tf1"):
        matrix = inception.bilinear_resize_matrix(256, 299, mode)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
        assert matrix.min() >= 0


def test_converter_round_trip_npz_and_safetensors(reference, converted, tmp_path):
    state_dict = reference[2]
    checkpoint = tmp_path / inception.FID_WEIGHTS_FILENAME
    torch.save(state_dict, checkpoint)
    npz = tmp_path / "inception.npz"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.convert_inception",
            f"--input={checkpoint}",
            f"--output={npz}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = inception.convert_checkpoint(checkpoint, tmp_path / "inception.safetensors")
    expected = inception.expected_shapes()
    assert summary["include_fc"] and summary["tensors"] == len(expected)
    assert summary["parameters"] == sum(
        int(np.prod(shape)) for name, shape in expected.items() if name.startswith("params/")
    )
    for path in (npz, tmp_path / "inception.safetensors"):
        variables, include_fc = inception.load_variables(path)
        assert include_fc
        flat = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
        assert len(flat) == len(converted)
        np.testing.assert_array_equal(
            variables["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"],
            converted["params/Mixed_6d/branch1x1/conv/kernel"],
        )
        np.testing.assert_array_equal(
            variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
            state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy(),
        )
    # Conv layout: torch (O, I, kh, kw) -> (kh, kw, I, O) on an asymmetric 1x7 kernel.
    np.testing.assert_array_equal(
        converted["params/Mixed_6b/branch7x7_2/conv/kernel"],
        state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )


def test_wrapper_state_dict_converts_without_classifier(reference, converted):
    wrapper = reference[0]
    flat = inception.convert_state_dict(wrapper.state_dict())
    assert not inception.check_variables(flat)  # no fc: include_fc False
    assert set(flat) == {name for name in converted if "/fc/" not in name}
    for name, value in flat.items():
        np.testing.assert_array_equal(value, converted[name])


def test_feature_extractor_matches_forward(converted, jax_forward, images, torch_outputs):
    """InceptionFeatures (padded fixed batches) gives ADM's pool / spatial / logits layout."""
    extractor = inception.InceptionFeatures(_variables(converted), batch_size=2)
    # Three images in batches of 2: the padded second batch must not leak into the results.
    three = np.concatenate([images, images[:1]])
    features = extractor(three)
    truth = torch_outputs["float64"]
    assert features["pool"].shape == (3, 2048) and features["spatial"].shape == (3, 2023)
    np.testing.assert_allclose(features["pool"][2], features["pool"][0], rtol=1e-6)
    assert _relative_error(features["pool"][:2], truth["pool"]) < RELATIVE_TOLERANCE
    spatial = metrics.sfid_features(truth["mixed_6"])
    assert _relative_error(features["spatial"][:2], spatial) < RELATIVE_TOLERANCE
    assert _relative_error(features["adm_logits"][:2], truth["adm_logits"]) < RELATIVE_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Errors for bad weight files (issue 9)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_inception"):
        inception.load_variables(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        inception.load_torch_checkpoint(tmp_path / "absent.pth")


def test_corrupt_and_truncated_files(converted, tmp_path):
    good = tmp_path / "good.npz"
    inception.save_variables(good, converted)
    data = good.read_bytes()
    for name, content in (("garbage.npz", b"not a zip"), ("truncated.npz", data[: len(data) // 2])):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(inception.InceptionWeightsError, match="not a readable"):
            inception.load_variables(path)
    safetensors = tmp_path / "good.safetensors"
    inception.save_variables(safetensors, converted)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(safetensors.read_bytes()[:1000])
    with pytest.raises(inception.InceptionWeightsError, match="safetensors"):
        inception.load_variables(truncated)
    not_torch = tmp_path / "not_torch.pth"
    not_torch.write_bytes(b"garbage")
    with pytest.raises(inception.InceptionWeightsError, match="not a readable PyTorch"):
        inception.load_torch_checkpoint(not_torch)


def test_pickled_torch_objects_are_refused(tmp_path):
    """torch.load(weights_only=True): a checkpoint holding an arbitrary object is refused."""
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2), "payload": _Payload()}, path)
    with pytest.raises(inception.InceptionWeightsError, match="not a readable PyTorch"):
        inception.load_torch_checkpoint(path)


class _Payload:
    """Stands for an arbitrary pickled object."""


def test_mismatched_tensors_are_named(converted, tmp_path):
    missing = {k: v for k, v in converted.items() if k != "params/Mixed_6d/branch1x1/conv/kernel"}
    with pytest.raises(inception.InceptionWeightsError, match=r"1 missing.*Mixed_6d/branch1x1"):
        inception.check_variables(missing)
    extra = {**converted, "params/extra/kernel": np.zeros(3, np.float32)}
    with pytest.raises(inception.InceptionWeightsError, match=r"1 unexpected.*extra"):
        inception.check_variables(extra)
    reshaped = dict(converted)
    reshaped["params/Mixed_7a/branch3x3_2/conv/kernel"] = np.zeros((3, 3, 192, 321), np.float32)
    with pytest.raises(inception.InceptionWeightsError, match=r"branch3x3_2/conv/kernel.*321"):
        inception.check_variables(reshaped)
    nonfinite = dict(converted)
    nonfinite["batch_stats/Conv2d_1a_3x3/bn/var"] = np.full(32, np.nan, np.float32)
    with pytest.raises(inception.InceptionWeightsError, match="non-finite"):
        inception.check_variables(nonfinite)
    # A mis-shaped tensor in a file fails at load time, naming the file.
    path = tmp_path / "reshaped.npz"
    np.savez(path, **reshaped)
    with pytest.raises(inception.InceptionWeightsError, match=r"reshaped\.npz"):
        inception.load_variables(path)
    with pytest.raises(inception.InceptionWeightsError, match="Unexpected tensor"):
        inception.convert_state_dict({"features.0.weight": np.zeros((3, 3))})


def test_pickled_npz_is_refused(tmp_path):
    objects = np.empty(1, dtype=object)
    objects[0] = {"payload": 1}
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"params/fc/bias": objects})
    with pytest.raises(inception.InceptionWeightsError, match="refusing to unpickle"):
        inception.load_variables(path)


def test_frechet_distance_matches_pytorch_fid():
    """An independent implementation of the formula: pytorch-fid's calculate_frechet_distance."""
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(5)
    first = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
    second = 0.7 * rng.normal(size=(80, 12)) @ rng.normal(size=(12, 12)) + 0.4
    stats1, stats2 = metrics.feature_statistics(first), metrics.feature_statistics(second)
    want = fid_score.calculate_frechet_distance(*stats1, *stats2)
    assert metrics.frechet_distance(*stats1, *stats2) == pytest.approx(want, rel=1e-9)
