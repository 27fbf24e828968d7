"""Sample-quality metrics of the ADM evaluation suite, as pure functions of feature arrays.

ADM (guided-diffusion's `evaluations/evaluator.py`, used by DiT and DiffuSSM) runs Inception-V3
on uint8 images and reports five numbers; this module computes all five from the activations:

    FID        frechet_distance of the pool_3 features (N, 2048)
    sFID       frechet_distance of the spatial features: the first 7 channels of mixed_6/conv,
               (N, 17, 17, 7) flattened to (N, 2023)
    IS         inception_score of the softmax predictions (N, 1008), in splits of 5000
    Precision  fraction of samples inside the k=3 nearest-neighbour manifold of the reference
    Recall     fraction of reference images inside the manifold of the samples

Frechet distances and Inception Scores are computed in float64 with numpy/scipy; the pairwise
distances of precision/recall run in float32 blocks under `jax.jit`, so 50K x 10K features use
the accelerator when there is one. `adm_metrics` gives all five at once. Reading and writing
the .npz files these come from is `adm_io`'s job.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg, special

if TYPE_CHECKING:  # only annotates adm_metrics: the formulas never touch files
    from diffussm_jax.evaluation.adm_io import ReferenceBatch

# ADM keeps this many channels of mixed_6/conv for sFID (`spatial[..., :7]`).
SFID_CHANNELS = 7
# ADM's `compute_inception_score(split_size=5000)`: 10 splits for the 50K protocol.
INCEPTION_SCORE_SPLIT_SIZE = 5000
# ADM's ManifoldEstimator defaults: k=3 neighbourhoods, 10000 x 10000 distance blocks.
NUM_NEIGHBOURS = 3
DISTANCE_BATCH_SIZE = 10000


# ---------------------------------------------------------------------------------------------
# Frechet distance (FID, sFID)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, as ADM's `compute_statistics`.

    Args:
      features: (N, D) with N >= 2; any float dtype (accumulated in float64).

    Returns:
      mu: (D,) float64; sigma: (D, D) float64 unbiased (ddof=1) covariance, like `np.cov`.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Expected (N, D) features with N >= 2, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    The square root is scipy's Schur-method `sqrtm`, as in ADM and TTUR, so results match the
    published evaluator. When the product is singular enough that `sqrtm` returns non-finite
    values, `eps` is added to both diagonals and the root recomputed (a warning says so). A
    complex result whose diagonal has an imaginary part above 1e-3 means the covariances are
    not positive semi-definite and raises.

    Args:
      mu1, mu2: (D,) means.
      sigma1, sigma2: (D, D) symmetric positive semi-definite covariances.
      eps: diagonal offset for the singular-product fallback.

    Returns:
      The squared Frechet distance (what FID reports; it is not square-rooted).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"Mean vectors differ or are not 1-D: {mu1.shape} vs {mu2.shape}.")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"Covariances {sigma1.shape} and {sigma2.shape} must both be ({dim}, {dim})."
        )
    for name, array in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} has non-finite entries; check the features it came from.")

    diff = mu1 - mu2
    # scipy warns on singular products even when the root it returns is fine (the common case
    # for N < D or dead features); the finiteness check below is what decides.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"Frechet distance: singular covariance product; adding {eps} to the diagonals.",
                RuntimeWarning,
                stacklevel=2,
            )
            offset = np.eye(dim) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; large ones mean the inputs are not covariances.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2): "
                "are both inputs symmetric positive semi-definite?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _statistics(reference: np.ndarray | tuple[np.ndarray, np.ndarray]):
    if isinstance(reference, tuple):
        return reference
    return feature_statistics(reference)


def fid(
    sample_features: np.ndarray, reference: np.ndarray | tuple[np.ndarray, np.ndarray]
) -> float:
    """FID: Frechet distance of Inception pool_3 features.

    Args:
      sample_features: (N, D) pool features of the samples (D = 2048 for Inception-V3).
      reference: (M, D) reference features, or their precomputed `(mu, sigma)` (e.g. from
        `load_reference_batch(...).pool_statistics`).
    """
    return frechet_distance(*feature_statistics(sample_features), *_statistics(reference))


def sfid_features(spatial: np.ndarray) -> np.ndarray:
    """ADM's sFID features from mixed_6/conv activations.

    Args:
      spatial: (N, H, W, C) mixed_6/conv maps (17 x 17 x 768 for Inception-V3 at 299px), or
        (N, F) features that were already cut to 7 channels and flattened (returned as is).

    Returns:
      (N, H * W * 7) float: the first 7 channels, flattened in (H, W, C) order like ADM.
    """
    spatial = np.asarray(spatial)
    if spatial.ndim == 2:
        return spatial
    if spatial.ndim != 4 or spatial.shape[-1] < SFID_CHANNELS:
        raise ValueError(
            f"Expected (N, H, W, C>={SFID_CHANNELS}) mixed_6/conv maps or (N, F) flattened "
            f"features, got {spatial.shape}."
        )
    return spatial[..., :SFID_CHANNELS].reshape(spatial.shape[0], -1)


def sfid(
    sample_spatial: np.ndarray, reference: np.ndarray | tuple[np.ndarray, np.ndarray]
) -> float:
    """sFID: Frechet distance of spatial features (see `sfid_features`).

    Args:
      sample_spatial: (N, H, W, C) mixed_6/conv maps or (N, F) flattened sFID features.
      reference: the same for the reference set, or its precomputed `(mu_s, sigma_s)`.
    """
    if not isinstance(reference, tuple):
        reference = sfid_features(reference)
    return fid(sfid_features(sample_spatial), reference)


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(
    predictions: np.ndarray,
    *,
    from_logits: bool = False,
    split_size: int = INCEPTION_SCORE_SPLIT_SIZE,
) -> float:
    """Inception Score, as ADM (and improved-GAN) compute it.

    The predictions are cut into consecutive splits of `split_size` rows (10 splits for 50K
    samples); each split scores exp(mean_x KL(p(y|x) || p(y))) with p(y) the split's mean
    prediction, and the score is the mean over splits. 0 log 0 is taken as 0, so exactly
    one-hot predictions are valid (ADM's `np.log` would give NaN there).

    Args:
      predictions: (N, K) softmax probabilities, or logits when `from_logits`.
      from_logits: apply a float64 log-softmax first.
      split_size: rows per split; the last split may be shorter.

    Returns:
      The score, in [1, K] (1: every prediction equal; K: confident and spread evenly).
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim != 2 or predictions.shape[0] == 0:
        raise ValueError(f"Expected (N, K) predictions, got shape {predictions.shape}.")
    if from_logits:
        log_probs = special.log_softmax(predictions, axis=1)
        probs = np.exp(log_probs)
    else:
        probs = predictions
        # Catch logits passed as probabilities, which would give a meaningless score.
        if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError(
                "predictions are not probabilities (negative, or rows do not sum to 1); pass "
                "from_logits=True for logits."
            )
        log_probs = np.log(np.where(probs > 0, probs, 1.0))
    scores = []
    for begin in range(0, len(probs), split_size):
        part, log_part = probs[begin : begin + split_size], log_probs[begin : begin + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))
        # Where p(y|x) = 0 the term is 0 whatever the logs are; p(y) = 0 implies p(y|x) = 0.
        kl = np.where(part > 0, part * (log_part - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019)


def _pairwise_squared_distances(rows: jax.Array, columns: jax.Array) -> jax.Array:
    """(R, D), (C, D) -> (R, C) squared Euclidean distances, clamped at 0 like ADM's."""
    row_norms = jnp.sum(rows * rows, axis=1)[:, None]
    column_norms = jnp.sum(columns * columns, axis=1)[None, :]
    # HIGHEST keeps the matmul in float32 on TPU/GPU, whose default would round to bf16/tf32.
    cross = jnp.matmul(rows, columns.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(row_norms - 2.0 * cross + column_norms, 0.0)


@functools.partial(jax.jit, static_argnames="num_nearest")
def _merge_nearest(nearest, rows, columns, column_valid, num_nearest):
    """Folds one column block into the running `num_nearest` smallest distances per row.

    nearest: (R, num_nearest) ascending; rows: (R, D); columns: (C, D); column_valid: (C,) bool.
    """
    distances = _pairwise_squared_distances(rows, columns)
    distances = jnp.where(column_valid[None, :], distances, jnp.inf)
    negated, _ = jax.lax.top_k(-jnp.concatenate([nearest, distances], axis=1), num_nearest)
    return -negated


@jax.jit
def _manifold_membership(rows, row_radii, columns, column_radii):
    """Which rows lie in some column's ball, and which columns in some row's ball.

    rows: (R, D), row_radii: (R,), columns: (C, D), column_radii: (C,); radii are squared
    distances, -inf for padding. Returns (R,) bool, (C,) bool.
    """
    distances = _pairwise_squared_distances(rows, columns)
    rows_inside = jnp.any(distances <= column_radii[None, :], axis=1)
    columns_inside = jnp.any(distances <= row_radii[:, None], axis=0)
    return rows_inside, columns_inside


def _blocks(features: np.ndarray, batch_size: int):
    """Yields (start, stop, padded (B, D) float32 block, (B,) valid mask) with B fixed.

    A fixed block size means one compilation per feature set; B = min(batch_size, N) so small
    inputs do not pay for 10000-row blocks.
    """
    count = len(features)
    block = min(batch_size, count)
    for start in range(0, count, block):
        stop = min(start + block, count)
        padded = np.zeros((block, features.shape[1]), np.float32)
        padded[: stop - start] = features[start:stop]
        valid = np.arange(block) < stop - start
        yield start, stop, padded, valid


def _check_features(name: str, features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {features.shape}.")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} has non-finite entries.")
    return features


def manifold_radii(
    features: np.ndarray,
    *,
    num_neighbours: int = NUM_NEIGHBOURS,
    batch_size: int = DISTANCE_BATCH_SIZE,
) -> np.ndarray:
    """Squared distance from each feature to its k-th nearest neighbour in the same set.

    As ADM's `ManifoldEstimator.manifold_radii`: the point itself counts as its own 0-th
    neighbour, so the radius is the (k+1)-th smallest distance of its row.

    Args:
      features: (N, D) with N > num_neighbours.
      num_neighbours: k.
      batch_size: rows and columns per distance block (memory ~ batch_size^2 floats).

    Returns:
      (N,) float32 squared radii.
    """
    features = _check_features("features", features)
    if len(features) <= num_neighbours:
        raise ValueError(f"Need more than {num_neighbours} features, got {len(features)}.")
    radii = np.empty(len(features), np.float32)
    for row_start, row_stop, rows, _ in _blocks(features, batch_size):
        nearest = jnp.full((len(rows), num_neighbours + 1), jnp.inf, jnp.float32)
        for _, _, columns, column_valid in _blocks(features, batch_size):
            nearest = _merge_nearest(nearest, rows, columns, column_valid, num_neighbours + 1)
        radii[row_start:row_stop] = np.asarray(nearest[: row_stop - row_start, num_neighbours])
    return radii


def precision_recall(
    reference_features: np.ndarray,
    sample_features: np.ndarray,
    *,
    num_neighbours: int = NUM_NEIGHBOURS,
    batch_size: int = DISTANCE_BATCH_SIZE,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM computes them.

    Each set's manifold is the union of balls around its points whose radii reach the k-th
    nearest neighbour (`manifold_radii`); a point is inside if its distance is <= a radius.
    Distances are float32 (ADM tries float16 first; float32 changes results only at ties).

    Args:
      reference_features: (M, D) Inception pool features of the reference (real) images.
      sample_features: (N, D) the same for the samples.
      num_neighbours: k (ADM: 3).
      batch_size: rows and columns per distance block.

    Returns:
      (precision, recall): the fraction of samples inside the reference manifold and the
      fraction of reference points inside the sample manifold.
    """
    reference = _check_features("reference_features", reference_features)
    samples = _check_features("sample_features", sample_features)
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(f"Feature dims differ: {reference.shape} vs {samples.shape}.")
    reference_radii = manifold_radii(
        reference, num_neighbours=num_neighbours, batch_size=batch_size
    )
    sample_radii = manifold_radii(samples, num_neighbours=num_neighbours, batch_size=batch_size)
    reference_inside = np.zeros(len(reference), bool)
    sample_inside = np.zeros(len(samples), bool)

    def padded_radii(radii, start, stop, valid):
        # -inf radii make padding rows/columns contain nothing.
        out = np.full(len(valid), -np.inf, np.float32)
        out[: stop - start] = radii[start:stop]
        return out

    for ref_start, ref_stop, ref_block, ref_valid in _blocks(reference, batch_size):
        ref_block_radii = padded_radii(reference_radii, ref_start, ref_stop, ref_valid)
        for sample_start, sample_stop, sample_block, sample_valid in _blocks(samples, batch_size):
            sample_block_radii = padded_radii(sample_radii, sample_start, sample_stop, sample_valid)
            ref_in, sample_in = _manifold_membership(
                ref_block, ref_block_radii, sample_block, sample_block_radii
            )
            reference_inside[ref_start:ref_stop] |= np.asarray(ref_in)[: ref_stop - ref_start]
            sample_inside[sample_start:sample_stop] |= np.asarray(sample_in)[
                : sample_stop - sample_start
            ]
    return float(sample_inside.mean()), float(reference_inside.mean())


# ---------------------------------------------------------------------------------------------
# All five numbers


def adm_metrics(
    *,
    sample_pool: np.ndarray,
    sample_spatial: np.ndarray,
    sample_predictions: np.ndarray,
    reference_pool: np.ndarray,
    reference_spatial: np.ndarray | None = None,
    reference_batch: ReferenceBatch | None = None,
    from_logits: bool = False,
    batch_size: int = DISTANCE_BATCH_SIZE,
) -> dict[str, float]:
    """All five numbers of ADM's evaluator from Inception activations.

    As ADM's `main`: FID and sFID use the reference batch's stored statistics when it has them,
    otherwise the statistics of the reference activations.

    Args:
      sample_pool: (N, 2048) pool_3 features of the samples.
      sample_spatial: (N, 17, 17, 768) mixed_6/conv maps or (N, 2023) sFID features.
      sample_predictions: (N, 1008) softmax predictions (logits with `from_logits`).
      reference_pool: (M, 2048) pool_3 features of the reference images (`arr_0`).
      reference_spatial: like sample_spatial for the reference; needed only when the
        reference batch has no `mu_s`/`sigma_s`.
      reference_batch: the loaded reference file, for its stored statistics.
      from_logits: see `inception_score`.
      batch_size: distance block size for precision/recall.

    Returns:
      {"inception_score", "fid", "sfid", "precision", "recall"}.
    """
    pool_reference = reference_pool
    spatial_reference = reference_spatial
    if reference_batch is not None and reference_batch.pool_statistics is not None:
        pool_reference = reference_batch.pool_statistics
        spatial_reference = reference_batch.spatial_statistics or reference_spatial
    if spatial_reference is None:
        raise ValueError("sFID needs reference_spatial or a reference batch with mu_s/sigma_s.")
    precision, recall = precision_recall(reference_pool, sample_pool, batch_size=batch_size)
    return {
        "inception_score": inception_score(sample_predictions, from_logits=from_logits),
        "fid": fid(sample_pool, pool_reference),
        "sfid": sfid(sample_spatial, spatial_reference),
        "precision": precision,
        "recall": recall,
    }
