"""Evaluation tests: ADM's metrics against closed forms and brute-force float64 references, and
the digits classifier end to end.

The Frechet references use an eigendecomposition (tr sqrt(A^1/2 B A^1/2)) rather than the
library's Schur-method sqrtm, and precision/recall are checked against full distance matrices,
so a shared mistake is unlikely.
"""

import json
import logging
import os
import zipfile

import numpy as np
import pytest
from flax import traverse_util
from scipy import linalg, stats

from configs import quickstart
from diffussm_jax import data, inference, training
from diffussm_jax.evaluation import adm_io, digits, inception, metrics
from diffussm_jax.evaluation.inception import features as inception_features
from diffussm_jax.inference import score as run_evaluation
from diffussm_jax.sampling import batched
from diffussm_jax.training import hooks

# ---------------------------------------------------------------------------------------------
# Frechet distance


def _random_features(seed, count, dim, scale=1.0, shift=0.0):
    """Correlated Gaussian features: (count, dim) float64."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return scale * rng.normal(size=(count, dim)) @ mixing + shift


def _reference_frechet(mu1, sigma1, mu2, sigma2):
    """Symmetric formulation: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    eigenvalues, eigenvectors = linalg.eigh(sigma1)
    root1 = eigenvectors @ np.diag(np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    inner = linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root


def test_feature_statistics_match_numpy():
    features = _random_features(0, 50, 6)
    mu, sigma = metrics.feature_statistics(features.astype(np.float32))
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-6)
    # Unbiased (ddof=1) like ADM's np.cov.
    centered = features - features.mean(0)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-5)


def test_identical_sets_give_zero():
    features = _random_features(1, 300, 16)
    assert abs(metrics.fid(features, features)) < 1e-6
    mu, sigma = metrics.feature_statistics(features)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_shifted_means_equal_covariances_give_squared_mean_distance():
    features = _random_features(2, 400, 10)
    mu, sigma = metrics.feature_statistics(features)
    shift = np.random.default_rng(3).normal(size=10)
    distance = metrics.frechet_distance(mu, sigma, mu + shift, sigma)
    np.testing.assert_allclose(distance, np.sum(shift**2), rtol=1e-8)
    # The same through the features: a shift moves the mean only.
    np.testing.assert_allclose(metrics.fid(features + shift, features), np.sum(shift**2), rtol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_eigendecomposition_reference(seed):
    first = _random_features(seed, 200, 12)
    second = _random_features(seed + 10, 150, 12, scale=1.7, shift=0.3)
    stats1 = metrics.feature_statistics(first)
    stats2 = metrics.feature_statistics(second)
    expected = _reference_frechet(*stats1, *stats2)
    np.testing.assert_allclose(metrics.frechet_distance(*stats1, *stats2), expected, rtol=1e-9)
    # Symmetric in its arguments.
    np.testing.assert_allclose(metrics.frechet_distance(*stats2, *stats1), expected, rtol=1e-9)


def test_frechet_singular_covariances_stay_finite():
    # Fewer samples than dimensions, plus a dead (constant) feature: both covariances singular.
    first = _random_features(4, 6, 20)
    second = _random_features(5, 8, 20, shift=0.5)
    first[:, 3] = second[:, 3] = 1.0
    stats1, stats2 = metrics.feature_statistics(first), metrics.feature_statistics(second)
    distance = metrics.frechet_distance(*stats1, *stats2)
    assert np.isfinite(distance)
    np.testing.assert_allclose(distance, _reference_frechet(*stats1, *stats2), rtol=1e-6)


def test_frechet_falls_back_to_diagonal_offset(monkeypatch):
    """Older scipy returns inf/nan roots for singular products; the eps offset must recover."""
    first = _random_features(6, 5, 12)
    second = _random_features(7, 5, 12)
    stats1, stats2 = metrics.feature_statistics(first), metrics.feature_statistics(second)
    true_sqrtm = linalg.sqrtm
    calls = []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else true_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", failing_once)
    with pytest.warns(RuntimeWarning, match="singular"):
        distance = metrics.frechet_distance(*stats1, *stats2, eps=1e-6)
    assert len(calls) == 2
    # The retry roots (sigma1 + eps I)(sigma2 + eps I); the traces stay those of the inputs.
    offset = 1e-6 * np.eye(12)
    np.testing.assert_allclose(calls[1], (stats1[1] + offset) @ (stats2[1] + offset))
    with_offset = _reference_frechet(stats1[0], stats1[1] + offset, stats2[0], stats2[1] + offset)
    np.testing.assert_allclose(distance, with_offset - 2 * np.trace(offset), rtol=1e-9)
    # The offset moves the distance by about sqrt(eps) per null direction only.
    np.testing.assert_allclose(distance, _reference_frechet(*stats1, *stats2), atol=1e-2)


def test_frechet_rejects_non_psd_and_mismatched_inputs():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="differ"):
        metrics.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)


def test_sfid_uses_first_seven_channels_flattened():
    rng = np.random.default_rng(8)
    samples = rng.normal(size=(40, 3, 3, 10))
    reference = rng.normal(size=(50, 3, 3, 10)) + 0.2
    flat = metrics.sfid_features(samples)
    np.testing.assert_array_equal(flat, samples[..., :7].reshape(40, 63))
    expected = metrics.fid(flat, metrics.sfid_features(reference))
    assert metrics.sfid(samples, reference) == pytest.approx(expected, rel=1e-12)
    # Channels 7+ are ignored; channel 0 is not.
    changed_tail, changed_head = samples.copy(), samples.copy()
    changed_tail[..., 8] += 5.0
    changed_head[..., 0] += 5.0
    assert metrics.sfid(changed_tail, reference) == pytest.approx(expected, rel=1e-12)
    assert metrics.sfid(changed_head, reference) > expected + 1.0
    # Precomputed (mu_s, sigma_s) and already-flattened features give the same number.
    ref_stats = metrics.feature_statistics(metrics.sfid_features(reference))
    assert metrics.sfid(flat, ref_stats) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_uniform_predictions_is_one():
    assert metrics.inception_score(np.full((200, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_confident_even_predictions_is_num_classes():
    one_hot = np.eye(10)[np.arange(200) % 10]
    assert metrics.inception_score(one_hot) == pytest.approx(10.0, rel=1e-12)
    # Splits of 50 are each evenly spread too; all of one class per split scores 1.
    assert metrics.inception_score(one_hot, split_size=50) == pytest.approx(10.0, rel=1e-12)
    assert metrics.inception_score(np.eye(10)[np.arange(200) // 20], split_size=20) == (
        pytest.approx(1.0, abs=1e-12)
    )
    # Logits of confident predictions.
    assert metrics.inception_score(60.0 * one_hot, from_logits=True) == pytest.approx(10.0)


def test_inception_score_matches_scipy_entropy_per_split():
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=2.0, size=(37, 6))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for begin in range(0, 37, 10):
        part = probs[begin : begin + 10]
        marginal = part.mean(0)
        expected.append(np.exp(np.mean([stats.entropy(p, marginal) for p in part])))
    expected = np.mean(expected)
    assert metrics.inception_score(probs, split_size=10) == pytest.approx(expected, rel=1e-10)
    assert metrics.inception_score(logits, from_logits=True, split_size=10) == pytest.approx(
        expected, rel=1e-10
    )
    with pytest.raises(ValueError, match="from_logits"):
        metrics.inception_score(logits, split_size=10)


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _brute_force_precision_recall(reference, samples, k=3):
    def squared_distances(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    # Index k of the sorted row: the point itself is neighbour 0.
    reference_radii = np.sort(squared_distances(reference, reference), axis=1)[:, k]
    sample_radii = np.sort(squared_distances(samples, samples), axis=1)[:, k]
    cross = squared_distances(samples, reference)  # (N, M)
    precision = np.mean(np.any(cross <= reference_radii[None, :], axis=1))
    recall = np.mean(np.any(cross <= sample_radii[:, None], axis=0))
    return reference_radii, sample_radii, precision, recall


def test_precision_recall_matches_brute_force_with_blocks():
    rng = np.random.default_rng(10)
    reference = rng.normal(size=(41, 5))
    # Partly overlapping clouds, so both metrics lie strictly between 0 and 1.
    samples = rng.normal(size=(33, 5)) + np.array([1.0, 0, 0, 0, 0])
    ref_radii, sample_radii, precision, recall = _brute_force_precision_recall(reference, samples)
    assert 0.1 < precision < 0.9 and 0.1 < recall < 0.9
    # batch_size=7 forces several blocks, each with padding at the end.
    np.testing.assert_allclose(
        metrics.manifold_radii(reference, batch_size=7), ref_radii, rtol=1e-4
    )
    np.testing.assert_allclose(
        metrics.manifold_radii(samples, batch_size=7), sample_radii, rtol=1e-4
    )
    got = metrics.precision_recall(reference, samples, batch_size=7)
    assert got == pytest.approx((precision, recall), abs=1e-12)
    # One block gives the same answer.
    assert metrics.precision_recall(reference, samples) == got


def test_precision_recall_counts_the_ball_boundary_as_inside():
    # 1-D integers, exact in float32. Reference radii (k=3): 9 for 0 and 3, 4 for 1 and 2.
    reference = np.array([[0.0], [1.0], [2.0], [3.0]])
    # -3 lies exactly on the ball of 0; the others are far from everything.
    samples = np.array([[-3.0], [10.0], [20.0], [30.0]])
    # The ball of -3 (radius 33^2) holds every reference point.
    assert metrics.precision_recall(reference, samples) == (0.25, 1.0)
    assert metrics.precision_recall(samples, reference) == (1.0, 0.25)


def test_precision_recall_identical_and_disjoint_sets():
    features = np.random.default_rng(11).normal(size=(60, 8))
    assert metrics.precision_recall(features, features) == (1.0, 1.0)
    assert metrics.precision_recall(features, features + 100.0) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Files and the FID protocol's uint8 conversion


def test_reference_batch_loading(tmp_path):
    rng = np.random.default_rng(12)
    mu, sigma = rng.normal(size=4), np.eye(4)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    full = tmp_path / "full.npz"
    np.savez(full, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2), arr_0=images)
    batch = adm_io.load_reference_batch(full)
    np.testing.assert_array_equal(batch.pool_statistics[0], mu)
    np.testing.assert_array_equal(batch.spatial_statistics[1], np.eye(2))
    np.testing.assert_array_equal(batch.images, images)
    assert adm_io.load_reference_batch(full, load_images=False).images is None

    samples_only = tmp_path / "samples.npz"
    adm_io.save_sample_batch(samples_only, images, labels=np.arange(5))
    batch = adm_io.load_reference_batch(samples_only)
    assert batch.pool_statistics is None and batch.spatial_statistics is None
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(np.load(samples_only)["arr_1"], np.arange(5))

    empty = tmp_path / "empty.npz"
    np.savez(empty, other=np.zeros(3))
    with pytest.raises(ValueError, match="neither"):
        adm_io.load_reference_batch(empty)
    float_images = tmp_path / "float.npz"
    np.savez(float_images, arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        adm_io.load_reference_batch(float_images)


@pytest.mark.parametrize("key", ["arr_0", "mu"])
def test_reference_batch_rejects_pickled_arrays(tmp_path, key):
    objects = np.empty(2, dtype=object)
    objects[:] = [{"payload": 1}, None]
    arrays = {"mu": np.zeros(2), "sigma": np.eye(2), key: objects}
    path = tmp_path / "reference.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        adm_io.load_reference_batch(path)


def test_to_uint8_rounds_like_dit_and_inverts_the_data_pipeline():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    # The pipeline's float32 map back to uint8 is exact.
    np.testing.assert_array_equal(adm_io.to_uint8(data.to_model_range(pixels)), pixels)
    values = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, 1 / 255.0 - 1.0 + 1e-9])
    # 0 -> 127.5 rounds up to 128; out-of-range values clip; 0.5/127.5 - 1 rounds half up to 1.
    np.testing.assert_array_equal(adm_io.to_uint8(values), [0, 0, 128, 255, 255, 1])
    with pytest.raises(ValueError, match="non-finite"):
        adm_io.to_uint8(np.array([np.nan]))


def test_adm_metrics_combines_and_prefers_stored_statistics(tmp_path):
    rng = np.random.default_rng(13)
    sample_pool, reference_pool = rng.normal(size=(30, 6)), rng.normal(size=(40, 6)) + 0.3
    sample_spatial, reference_spatial = (
        rng.normal(size=(30, 2, 2, 8)),
        rng.normal(size=(40, 2, 2, 8)),
    )
    predictions = rng.dirichlet(np.ones(5), size=30)
    result = metrics.adm_metrics(
        sample_pool=sample_pool,
        sample_spatial=sample_spatial,
        sample_predictions=predictions,
        reference_pool=reference_pool,
        reference_spatial=reference_spatial,
    )
    assert result == {
        "inception_score": metrics.inception_score(predictions),
        "fid": metrics.fid(sample_pool, reference_pool),
        "sfid": metrics.sfid(sample_spatial, reference_spatial),
        "precision": metrics.precision_recall(reference_pool, sample_pool)[0],
        "recall": metrics.precision_recall(reference_pool, sample_pool)[1],
    }
    # As ADM: a reference file's mu/sigma (here of other features) replace the activations'.
    other_pool, other_spatial = rng.normal(size=(50, 6)), rng.normal(size=(50, 28))
    path = tmp_path / "ref.npz"
    pool_stats = metrics.feature_statistics(other_pool)
    spatial_stats = metrics.feature_statistics(other_spatial)
    np.savez(
        path, mu=pool_stats[0], sigma=pool_stats[1], mu_s=spatial_stats[0], sigma_s=spatial_stats[1]
    )
    stored = metrics.adm_metrics(
        sample_pool=sample_pool,
        sample_spatial=sample_spatial,
        sample_predictions=predictions,
        reference_pool=reference_pool,
        reference_batch=adm_io.load_reference_batch(path),
    )
    assert stored["fid"] == pytest.approx(metrics.fid(sample_pool, other_pool), rel=1e-12)
    assert stored["sfid"] == pytest.approx(metrics.sfid(sample_spatial, other_spatial), rel=1e-12)
    assert stored["precision"] == result["precision"]


# ---------------------------------------------------------------------------------------------
# Digits classifier and digits_quality

# Shorter than the default recipe (10 epochs) to keep CI fast; still above 95% held out.
SHORT_RECIPE = digits.ClassifierConfig(num_epochs=5)


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits_cache") / digits.CACHE_FILENAME)


@pytest.fixture(scope="module")
def evaluator(classifier_cache):
    return digits.load_or_train_classifier(classifier_cache, SHORT_RECIPE)


def test_classifier_trains_and_caches(evaluator, classifier_cache):
    assert evaluator.test_accuracy >= 0.95
    params, test_accuracy = digits.load_classifier(classifier_cache, SHORT_RECIPE)
    assert test_accuracy == evaluator.test_accuracy
    loaded = traverse_util.flatten_dict(params)
    for name, value in traverse_util.flatten_dict(evaluator.params).items():
        np.testing.assert_array_equal(loaded[name], value)
    # The file holds plain arrays only.
    with np.load(classifier_cache, allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)


def test_cache_reuse_and_retraining(evaluator, classifier_cache, tmp_path, monkeypatch, caplog):
    trained = []

    def fake_train(config, data_dir=None):
        trained.append(config)
        return evaluator.params, 0.5

    monkeypatch.setattr(digits, "train_classifier", fake_train)
    # A valid cache is reused, with or without naming its recipe.
    assert digits.load_or_train_classifier(classifier_cache, SHORT_RECIPE).test_accuracy == (
        evaluator.test_accuracy
    )
    assert digits.load_or_train_classifier(classifier_cache).test_accuracy == (
        evaluator.test_accuracy
    )
    assert not trained
    # Corrupt files and another recipe retrain, say so, and rewrite the cache.
    corrupt = tmp_path / "corrupt.npz"
    for garbage in (b"not a zip file", open(classifier_cache, "rb").read()[:200]):
        corrupt.write_bytes(garbage)
        with caplog.at_level(logging.WARNING):
            assert digits.load_or_train_classifier(corrupt).test_accuracy == 0.5
        assert "retraining" in caplog.text
        caplog.clear()
        assert digits.load_classifier(str(corrupt))[1] == 0.5
    copy = tmp_path / "copy.npz"
    copy.write_bytes(open(classifier_cache, "rb").read())
    other_recipe = digits.ClassifierConfig(seed=1)
    assert digits.load_or_train_classifier(copy, other_recipe).test_accuracy == 0.5
    assert trained == [digits.ClassifierConfig(), digits.ClassifierConfig(), other_recipe]
    assert digits.load_classifier(str(copy), other_recipe)[1] == 0.5
    # Missing file: train with the default recipe.
    assert digits.load_or_train_classifier(tmp_path / "missing.npz").test_accuracy == 0.5
    assert os.path.exists(tmp_path / "missing.npz")


def test_digits_quality_separates_real_noise_and_wrong_labels(evaluator):
    images, labels = digits.load_digits(data.CLASSIFIER_TEST_SPLIT)
    real = evaluator.quality(images, labels)
    assert real["accuracy"] == evaluator.test_accuracy >= 0.95
    assert real["per_class_accuracy"].shape == (10,) and real["per_class_accuracy"].min() > 0.7
    assert real["frechet_distance"] == pytest.approx(real["held_out_frechet_distance"])
    # uint8 input scores the same as its float image.
    as_uint8 = evaluator.quality(adm_io.to_uint8(images), labels)
    assert as_uint8["frechet_distance"] == pytest.approx(real["frechet_distance"], rel=1e-6)

    noise = np.random.default_rng(14).uniform(-1, 1, images.shape)
    noisy = evaluator.quality(noise, labels)
    assert noisy["frechet_distance"] > 20 * real["frechet_distance"]

    shuffled = evaluator.quality(images, np.random.default_rng(15).permutation(labels))
    assert shuffled["accuracy"] < 0.25
    # Same images, so the same distribution: only the accuracy sees the wrong labels.
    assert shuffled["frechet_distance"] == pytest.approx(real["frechet_distance"], rel=1e-9)

    # Real digits the classifier trained on sit at least as close to the training statistics.
    train_images, train_labels = digits.load_digits(data.CLASSIFIER_TRAIN_SPLIT)
    seen = evaluator.quality(train_images[:500], train_labels[:500])
    assert seen["frechet_distance"] < 2 * real["frechet_distance"]


def test_low_resolution_digits_are_scored_against_real_digits_at_their_size(evaluator):
    images, labels = digits.load_digits(data.CLASSIFIER_TEST_SPLIT)
    small = digits.downsample_digits(adm_io.to_uint8(images), 16)
    assert small.shape == (500, 16, 16, 1) and small.dtype == np.uint8
    # The pipeline's 32 -> 16 crop is a 2x2 BOX mean (PIL's fixed-point rounding: within 1 level).
    np.testing.assert_allclose(
        small[..., 0].astype(float),
        adm_io.to_uint8(images)[..., 0].reshape(500, 16, 2, 16, 2).astype(float).mean((2, 4)),
        atol=1.0,
    )
    real16 = evaluator.quality(small, labels)
    assert real16["accuracy"] == real16["held_out_accuracy"] >= 0.95
    assert real16["frechet_distance"] == pytest.approx(real16["held_out_frechet_distance"])
    # Compared with training digits at 16x16, real 16x16 digits are about as close as at 32x32;
    # the 32x32 statistics would count the blur as distance.
    real32 = evaluator.quality(images, labels)["frechet_distance"]
    assert real16["frechet_distance"] < 2 * real32
    _, features = digits.classify(evaluator.params, digits._to_model_range(small))
    against_32 = metrics.frechet_distance(
        *metrics.feature_statistics(features), *evaluator.reference_statistics
    )
    assert against_32 > 3 * real16["frechet_distance"]
    noise = evaluator.quality(np.random.default_rng(3).uniform(-1, 1, small.shape), labels)
    assert noise["frechet_distance"] > 3 * real16["frechet_distance"]
    assert noise["accuracy"] < 0.3
    with pytest.raises(ValueError, match="16, 16, 1"):
        evaluator.quality(small[:, :, :12], labels)


def test_digits_quality_function_uses_the_cache(evaluator, classifier_cache):
    images, labels = digits.load_digits(data.CLASSIFIER_TEST_SPLIT)
    result = digits.digits_quality(images[:100], labels[:100], cache_path=classifier_cache)
    assert result["classifier_test_accuracy"] == evaluator.test_accuracy
    assert result["num_samples"] == 100 and np.isnan(result["per_class_accuracy"]).sum() == 0
    with pytest.raises(ValueError, match="requested_labels"):
        digits.digits_quality(images[:4], labels[:3], cache_path=classifier_cache)
    with pytest.raises(ValueError, match="32, 32, 1"):
        digits.digits_quality(images[:4, :28], labels[:4], cache_path=classifier_cache)


def test_classifier_training_is_deterministic():
    tiny_recipe = digits.ClassifierConfig(num_epochs=1, batch_size=512, seed=3)
    first, first_accuracy = digits.train_classifier(tiny_recipe)
    second, second_accuracy = digits.train_classifier(tiny_recipe)
    assert first_accuracy == second_accuracy
    flat_second = traverse_util.flatten_dict(second)
    for name, value in traverse_util.flatten_dict(first).items():
        np.testing.assert_array_equal(flat_second[name], value)


# ---------------------------------------------------------------------------------------------
# Protocol pieces: labels, the streamed sample file


def test_draw_labels_uniform_seeded_balanced_and_unconditional():
    first = adm_io.draw_labels(100_000, 10, seed=3, mode="uniform")
    np.testing.assert_array_equal(first, adm_io.draw_labels(100_000, 10, seed=3, mode="uniform"))
    assert not np.array_equal(first, adm_io.draw_labels(100_000, 10, seed=4, mode="uniform"))
    # Uniform over the classes: chi-square test at the 0.1% level (9 degrees of freedom).
    counts = np.bincount(first, minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3 and first.min() == 0 and first.max() == 9
    np.testing.assert_array_equal(
        adm_io.draw_labels(12, 5, seed=0, mode="balanced"), [0, 1, 2, 3, 4] * 2 + [0, 1]
    )
    np.testing.assert_array_equal(adm_io.draw_labels(4, 0, seed=0, mode="uniform"), np.zeros(4))
    with pytest.raises(ValueError, match="balanced"):
        adm_io.draw_labels(4, 10, seed=0, mode="cycle")


def test_streamed_sample_file_equals_savez(tmp_path):
    images = np.random.default_rng(16).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    labels = np.arange(7)
    streamed, direct = tmp_path / "streamed.npz", tmp_path / "direct.npz"
    adm_io.save_sample_batch_streamed(streamed, [images[:3], images[3:]], images.shape, labels)
    adm_io.save_sample_batch(direct, images, labels)
    # The .npy members are byte-identical to np.savez's (ADM's streaming reader parses them).
    with zipfile.ZipFile(streamed) as a, zipfile.ZipFile(direct) as b:
        assert a.read("arr_0.npy") == b.read("arr_0.npy")
        assert a.read("arr_1.npy") == b.read("arr_1.npy")
    np.testing.assert_array_equal(adm_io.load_reference_batch(streamed).images, images)
    with pytest.raises(ValueError, match="expected 8"):
        adm_io.save_sample_batch_streamed(streamed, [images], (8, 4, 5, 3))
    with pytest.raises(ValueError, match="does not fit"):
        adm_io.save_sample_batch_streamed(streamed, [images[..., :1]], images.shape)
    # A failed write leaves the previous file intact.
    np.testing.assert_array_equal(adm_io.load_reference_batch(streamed).images, images)


def test_preview_grid_puts_each_balanced_class_in_its_own_column(tmp_path):
    # Two shards of 64 and 40 one-pixel images whose value is their label (balanced: i % 10).
    labels = np.arange(104) % 10
    paths = []
    for name, part in (("a", labels[:64]), ("b", labels[64:])):
        paths.append(str(tmp_path / f"{name}.npz"))
        np.savez(paths[-1], images=part.astype(np.uint8).reshape(-1, 1, 1, 1))
    grid = run_evaluation.preview_grid(paths, "balanced", num_classes=10)
    # 100 samples enlarged to 48x48 cells with 2-pixel padding: 10 rows x 10 columns.
    assert grid.shape == (10 * 50 + 2, 10 * 50 + 2, 1)
    cells = grid[2::50, 2::50, 0][:10, :10]
    np.testing.assert_array_equal(cells, np.tile(np.arange(10), (10, 1)))
    square = run_evaluation.preview_grid(paths, "uniform", num_classes=10)
    assert square.shape == grid.shape  # 100 samples: about square whatever the labels


# ---------------------------------------------------------------------------------------------
# launch.evaluate's library: resumable sampling, the sample file, scores; in-training FID


def _smoke_config(**fields):
    config = quickstart.get_config("smoke")
    with config.unlocked():
        config.data.data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
        config.num_train_steps = 2
        config.checkpoint_every_steps = 2
        config.sample_every_steps = 0
        config.update_from_flattened_dict(fields)
    return config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A 2-step smoke run (tiny DiffuSSM on the digits) with a checkpoint at step 2."""
    workdir = str(tmp_path_factory.mktemp("smoke_run"))
    training.train(_smoke_config(), workdir)
    return workdir


# 20 samples in batches of 8 (the 8 test devices): 3 batches, the last one padded.
EVAL_ARGS = dict(num_samples=20, steps=2, batch_size=8, seed=5)


@pytest.fixture(scope="module")
def straight_evaluation(trained_workdir, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("eval_straight"))
    return run_evaluation.evaluate(trained_workdir, output_dir=output_dir, **EVAL_ARGS)


def _load_samples(path):
    with np.load(path, allow_pickle=False) as f:
        return f["arr_0"], f["arr_1"]


def test_evaluate_writes_adm_file_and_digit_scores(straight_evaluation):
    result = straight_evaluation
    images, labels = _load_samples(result["samples"])
    side = _smoke_config().data.image_size
    assert images.dtype == np.uint8 and images.shape == (20, side, side, 1)
    np.testing.assert_array_equal(labels, adm_io.draw_labels(20, 10, seed=5, mode="uniform"))
    name = os.path.basename(result["samples"])
    # The name records model, step, N x shape, sampler + steps, cfg and seed.
    assert name == f"samples_DiffuSSM-S_step2_20x{side}x{side}x1_dpm++2m2_cfg3_seed5.npz"
    assert (result["model"], result["step"], result["steps"], result["cfg_scale"]) == (
        "DiffuSSM-S",
        2,
        2,
        3.0,
    )
    assert "round((x + 1) * 127.5)" in result["uint8"]
    with open(result["samples"][: -len(".npz")] + ".json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["num_samples"] == 20 and 0 <= result["accuracy"] <= 1
    assert result["frechet_distance"] > 0 and result["classifier_test_accuracy"] > 0.95
    assert os.path.isfile(result["grid"])


def test_evaluate_resumes_after_interruption_identically(
    trained_workdir, straight_evaluation, tmp_path, monkeypatch
):
    output_dir = str(tmp_path)
    true_draw = batched.draw
    calls = []

    def draw_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill during the second batch")
        return true_draw(*args, **kwargs)

    monkeypatch.setattr(batched, "draw", draw_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation.evaluate(trained_workdir, output_dir=output_dir, **EVAL_ARGS)
    (shard_dir,) = [p for p in os.listdir(output_dir) if p.endswith(".shards")]
    shard_dir = os.path.join(output_dir, shard_dir)
    assert sorted(os.listdir(shard_dir)) == ["batch_000000.npz", "manifest.json"]

    def counting_draw(*args, **kwargs):
        calls.append(1)
        return true_draw(*args, **kwargs)

    monkeypatch.setattr(batched, "draw", counting_draw)
    calls.clear()
    resumed = run_evaluation.evaluate(trained_workdir, output_dir=output_dir, **EVAL_ARGS)
    assert len(calls) == 2  # batch 0 was kept
    for got, want in zip(
        _load_samples(resumed["samples"]),
        _load_samples(straight_evaluation["samples"]),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    assert resumed["frechet_distance"] == straight_evaluation["frechet_distance"]

    # A corrupt shard is drawn again; the rest are kept.
    with open(os.path.join(shard_dir, "batch_000001.npz"), "wb") as f:
        f.write(b"torn write")
    calls.clear()
    again = run_evaluation.evaluate(trained_workdir, output_dir=output_dir, **EVAL_ARGS)
    assert len(calls) == 1
    np.testing.assert_array_equal(
        _load_samples(again["samples"])[0], _load_samples(straight_evaluation["samples"])[0]
    )
    # Other settings in the same directory are refused rather than mixed in.
    with pytest.raises(ValueError, match="labels"):
        run_evaluation.evaluate(
            trained_workdir, output_dir=output_dir, labels="balanced", **EVAL_ARGS
        )


def _low_rank_frechet(features, mu, sigma):
    """Frechet distance of N features (N << D) to N(mu, sigma), in float64.

    With X the centred features, sigma_1 = X^T X / (N - 1), and the non-zero eigenvalues of
    sigma_1 sigma equal those of the N x N matrix X sigma X^T / (N - 1), whose square roots sum
    to tr((sigma_1 sigma)^1/2).
    """
    features = np.asarray(features, np.float64)
    centred = features - features.mean(0)
    count = len(features)
    eigenvalues = linalg.eigvalsh(centred @ sigma @ centred.T / (count - 1))
    trace_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    trace_1 = np.sum(centred**2) / (count - 1)
    mean_term = np.sum((features.mean(0) - mu) ** 2)
    return mean_term + trace_1 + np.trace(sigma) - 2 * trace_root


def _random_inception_file(path):
    """He-initialised Inception weights with identity BatchNorm: finite, O(1) activations."""
    rng = np.random.default_rng(17)
    flat = {}
    for name, shape in inception.expected_shapes().items():
        if name.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            flat[name] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
        elif name.endswith(("scale", "var")):
            flat[name] = np.ones(shape, np.float32)
        else:
            flat[name] = np.zeros(shape, np.float32)
    inception.save_variables(path, flat)


def test_evaluate_with_inception_and_reference(
    trained_workdir, straight_evaluation, tmp_path, monkeypatch
):
    """--inception/--reference: ADM's five numbers from our Inception, reference acts cached.

    The network runs at 75 px (the smallest input it takes) instead of 299 to save CPU time;
    test_inception.py checks the 299 px network against pytorch-fid's.
    """
    monkeypatch.setattr(inception_features, "INPUT_SIZE", 75)
    weights = tmp_path / "inception.npz"
    _random_inception_file(weights)
    # A reference batch of 10 real digits (as ADM's: images plus pool/spatial statistics).
    real, _ = digits.load_digits(data.CLASSIFIER_TEST_SPLIT)
    reference_images = adm_io.to_uint8(real[:10])
    # Batches of 8 like evaluate's (its shards hold 8 images): one compilation for both.
    extractor = inception.InceptionFeatures.from_file(
        weights, batch_size=8, preprocessing="tf_graph"
    )
    reference_acts = extractor(reference_images)
    pool_stats = metrics.feature_statistics(reference_acts["pool"])
    spatial_stats = metrics.feature_statistics(reference_acts["spatial"])
    reference = tmp_path / "reference.npz"
    np.savez(
        reference,
        arr_0=reference_images,
        mu=pool_stats[0],
        sigma=pool_stats[1],
        mu_s=spatial_stats[0],
        sigma_s=spatial_stats[1],
    )
    output_dir = os.path.dirname(straight_evaluation["samples"])  # reuses the finished shards
    result = run_evaluation.evaluate(
        trained_workdir,
        output_dir=output_dir,
        inception_path=str(weights),
        reference_path=str(reference),
        **EVAL_ARGS,
    )
    samples, _ = _load_samples(result["samples"])
    sample_acts = extractor(samples)
    precision, recall = metrics.precision_recall(reference_acts["pool"], sample_acts["pool"])
    expected = {
        # 2048-d FID from 20 samples by the low-rank route (a 20 x 20 eigenproblem), independent
        # of the 2048 x 2048 Schur square root evaluate takes (and much cheaper).
        "fid": _low_rank_frechet(sample_acts["pool"], *pool_stats),
        "sfid": metrics.sfid(sample_acts["spatial"], spatial_stats),
        "inception_score": metrics.inception_score(sample_acts["adm_logits"], from_logits=True),
        "precision": precision,
        "recall": recall,
    }
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert result["fid"] > 0 and 1 <= result["inception_score"] <= 1008
    assert result["inception_preprocessing"] == "tf_graph"
    cached = [p for p in os.listdir(output_dir) if p.startswith("reference_activations")]
    assert len(cached) == 1
    with pytest.raises(ValueError, match="both"):
        run_evaluation.evaluate(trained_workdir, inception_path=str(weights), **EVAL_ARGS)


def test_in_training_fid_hook(trained_workdir):
    config = _smoke_config(**{"eval.fid_every_steps": 5, "eval.fid_num_samples": 12})
    experiment = training.setup(config, for_training=False)
    params, _ = inference.restore_ema_params(experiment, trained_workdir)
    off = training.setup(_smoke_config(), experiment.mesh, experiment.model, for_training=False)
    assert hooks.SampleQualityHook.from_config(off) is None
    hook = hooks.SampleQualityHook.from_config(experiment)
    assert hook.scorer == "digits" and hook.draws.batch_size == 16
    assert [step for step in range(1, 16) if hook.due(step)] == [5, 10, 15]
    first = hook(params)
    assert set(first) == {"eval/digits_frechet_distance", "eval/digits_accuracy", "eval/seconds"}
    # The same samples as the uint8 draw, scored by the digits classifier.
    quality = digits.digits_quality(hook.sample(params), hook.labels, data_dir=config.data.data_dir)
    assert first["eval/digits_frechet_distance"] == quality["frechet_distance"]
    # Fixed labels and noise: the same weights give the same number at every evaluation.
    assert hook(params)["eval/digits_frechet_distance"] == first["eval/digits_frechet_distance"]
    other_data = _smoke_config(**{"eval.fid_every_steps": 5, "data.name": "imagenet2012"})
    with pytest.raises(ValueError, match="inception_path"):
        hooks.SampleQualityHook.from_config(
            training.setup(other_data, experiment.mesh, experiment.model, for_training=False)
        )
    half = _smoke_config(**{"eval.fid_every_steps": 5, "eval.reference_path": "ref.npz"})
    with pytest.raises(ValueError, match="together"):
        hooks.SampleQualityHook.from_config(
            training.setup(half, experiment.mesh, experiment.model, for_training=False)
        )
