"""Sample-quality evaluation: ADM's metrics on Inception features, and an offline digits check.

The FID protocol behind the paper's numbers (spec section 5; DiT's `sample_ddp.py` + ADM's
`evaluations/evaluator.py`), exactly:

  1. Samples: 50,000 images from the EMA weights. Class labels drawn uniformly at random from
     the 1000 ImageNet classes. Sampler: ancestral DDPM on 250 respaced steps (of T = 1000,
     evenly spaced, both ends included). "-G" rows: classifier-free guidance scale 1.5 (this
     repo guides all latent channels by default; DiT guides the first 3 of 4, an option).
     Latents are decoded by sd-vae-ft-ema after dividing by 0.18215.
  2. uint8 conversion: round((x + 1) * 127.5) with halves up, clipped to [0, 255], i.e. DiT's
     `clamp(127.5 * x + 128, 0, 255).to(uint8)` (`adm_io.to_uint8`). Saved as an .npz whose
     `arr_0` is uint8 (50000, 256, 256, 3) NHWC (`save_sample_batch[_streamed]`).
  3. Evaluation: `python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz` (512px:
     VIRTUAL_imagenet512.npz), ADM's TF1 Inception-V3 graph. It reports:
       Inception Score  softmax over 1008 logits of the samples, 10 splits of 5000;
       FID              pool_3 (2048-d) Frechet distance to the reference batch's `mu`/`sigma`;
       sFID             mixed_6/conv first 7 channels (17 x 17 x 7 = 2023-d) vs `mu_s`/`sigma_s`;
       Precision/Recall k=3 manifolds of pool_3 features, samples vs the reference's 10K images.

Modules:

  metrics.py    the formulas: FID, sFID, IS, precision/recall, feature statistics, pure functions.
  adm_io.py     ADM's files: sample labels, `to_uint8`, sample batches out, reference batches in.
  inception/    the Flax FID Inception-V3: network, preprocessing, weight files, feature extraction.
  digits.py     the offline digits check: a small cached CNN's accuracy and Frechet distance.

`inception` is a Flax port of pytorch-fid's FID Inception-V3 that loads weights converted from
pt_inception-2015-12-05 (`launch/convert_inception.py`) and matches pytorch-fid's network to
float32 accuracy. It preprocesses as pytorch-fid does or, in launch.evaluate, as the TF graph
does (TF1 resize, (x - 128) / 128); neither has been checked against the TF graph's
activations, so numbers for papers still come from ADM's evaluator run on our .npz
(docs/evaluation.md). FID depends on N; report FID-50K only from 50,000 samples.

Without Inception (CI, the embedded digits), `digits_quality` scores class-conditional digit
samples with a small cached CNN: classification accuracy against the requested labels and a
Frechet distance on its features, next to the same numbers for real held-out digits.
"""

from diffussm_jax.evaluation.adm_io import (
    UINT8_RULE,
    ReferenceBatch,
    draw_labels,
    load_reference_batch,
    save_sample_batch,
    save_sample_batch_streamed,
    to_uint8,
)
from diffussm_jax.evaluation.digits import (
    ClassifierConfig,
    DigitClassifier,
    DigitsEvaluator,
    default_cache_path,
    digits_quality,
    load_or_train_classifier,
    train_classifier,
)
from diffussm_jax.evaluation.metrics import (
    adm_metrics,
    feature_statistics,
    fid,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    sfid,
    sfid_features,
)

__all__ = [
    "UINT8_RULE",
    "ClassifierConfig",
    "DigitClassifier",
    "DigitsEvaluator",
    "ReferenceBatch",
    "adm_metrics",
    "default_cache_path",
    "digits_quality",
    "draw_labels",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "inception_score",
    "load_or_train_classifier",
    "load_reference_batch",
    "manifold_radii",
    "precision_recall",
    "save_sample_batch",
    "save_sample_batch_streamed",
    "sfid",
    "sfid_features",
    "to_uint8",
    "train_classifier",
]
