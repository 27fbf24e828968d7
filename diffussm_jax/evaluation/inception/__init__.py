"""Inception-V3 for FID, sFID, IS and precision/recall: pytorch-fid's FID variant, in Flax.

network.py        the Flax InceptionV3 (TF 2015-12-05 graph's pools and 1008-way classifier).
preprocessing.py  images -> network input: the pytorch-fid or TF-graph resize and pixel map.
weights.py        weight files: torch state-dict conversion, save / load / check, shapes.
features.py       `InceptionFeatures`: the jitted, fixed-batch run from uint8 images to features.
"""

from diffussm_jax.evaluation.inception.features import InceptionFeatures
from diffussm_jax.evaluation.inception.network import InceptionV3
from diffussm_jax.evaluation.inception.preprocessing import bilinear_resize_matrix, preprocess
from diffussm_jax.evaluation.inception.weights import (
    FID_WEIGHTS_FILENAME,
    InceptionWeightsError,
    check_variables,
    convert_checkpoint,
    convert_state_dict,
    expected_shapes,
    load_torch_checkpoint,
    load_variables,
    save_variables,
)

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "InceptionFeatures",
    "InceptionV3",
    "InceptionWeightsError",
    "bilinear_resize_matrix",
    "check_variables",
    "convert_checkpoint",
    "convert_state_dict",
    "expected_shapes",
    "load_torch_checkpoint",
    "load_variables",
    "preprocess",
    "save_variables",
]
