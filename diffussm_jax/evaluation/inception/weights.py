"""FID Inception weight files: conversion from PyTorch state dicts, save, load and check.

`launch/convert_inception.py` converts the public PyTorch file (`FID_WEIGHTS_FILENAME`) to .npz
or .safetensors (`convert_checkpoint`); `load_variables` reads it back without unpickling
anything and checks every tensor's name, shape and finiteness against the network
(`check_variables`, `expected_shapes`).
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffussm_jax import files
from diffussm_jax.evaluation.inception.network import INPUT_SIZE, InceptionV3

# The public weights of the FID Inception (pytorch-fid's port of the 2015-12-05 TF graph).
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"


class InceptionWeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the network."""


def _strip_wrapper_prefix(name: str) -> str:
    """pytorch-fid's `InceptionV3` wrapper stores `blocks.<i>.<j>.` before torchvision's names."""
    wrapper_blocks = (
        ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
        ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
        (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
        ),
        ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
    )
    if name.startswith("blocks."):
        _, block, layer, rest = name.split(".", 3)
        return f"{wrapper_blocks[int(block)][int(layer)]}.{rest}"
    return name


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PyTorch FID-Inception state dict -> flat `{"params/...": array, "batch_stats/...": array}`.

    Accepts torchvision names (`Mixed_6d.branch1x1.conv.weight`, as in the public
    pt_inception-2015-12-05 file) or pytorch-fid's wrapper names (`blocks.2.6.branch1x1...`,
    which have no fc). Conv weights (O, I, kh, kw) become Flax kernels (kh, kw, I, O); Linear
    weights (O, I) become (I, O); BatchNorm weight/bias/running_mean/running_var become
    scale/bias (params) and mean/var (batch_stats); `num_batches_tracked` is dropped.

    Args:
      state_dict: name -> tensor or array (anything `np.asarray` takes; torch tensors on CPU).

    Returns:
      float32 arrays keyed by '/'-joined Flax paths.
    """
    flat: dict[str, np.ndarray] = {}
    for raw_name, tensor in state_dict.items():
        name = _strip_wrapper_prefix(raw_name)
        *modules, leaf = name.split(".")
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor)
        value = value.astype(np.float32)
        path = "/".join(modules)
        if modules and modules[-1] == "conv" and leaf == "weight":
            if value.ndim != 4:
                raise InceptionWeightsError(
                    f"{raw_name}: expected a 4-D conv weight, got {value.shape}."
                )
            flat[f"params/{path}/kernel"] = value.transpose(2, 3, 1, 0)
        elif modules and modules[-1] == "bn":
            target = {
                "weight": "params/{}/scale",
                "bias": "params/{}/bias",
                "running_mean": "batch_stats/{}/mean",
                "running_var": "batch_stats/{}/var",
            }.get(leaf)
            if target is None:
                raise InceptionWeightsError(f"Unexpected BatchNorm tensor {raw_name}.")
            flat[target.format(path)] = value
        elif modules == ["fc"] and leaf == "weight":
            flat["params/fc/kernel"] = value.T
        elif modules == ["fc"] and leaf == "bias":
            flat["params/fc/bias"] = value
        elif modules and modules[0] == "AuxLogits":
            continue  # torchvision's auxiliary classifier is not part of the FID graph
        else:
            raise InceptionWeightsError(
                f"Unexpected tensor {raw_name} {value.shape}: not a FID Inception-V3 state dict?"
            )
    return flat


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch FID-Inception .pth with `torch.load(weights_only=True)` and converts it.

    Needs torch (the `reference` extra). The file may hold a state dict directly or under a
    "state_dict" key.
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Converting PyTorch weights needs torch: pip install -e '.[reference]'."
        ) from error
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. Download {FID_WEIGHTS_FILENAME} from pytorch-fid's GitHub "
            "releases (see docs/evaluation.md) and pass its path."
        )
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InceptionWeightsError(
            f"{path} is not a readable PyTorch weights file ({type(error).__name__}: {error})."
        ) from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise InceptionWeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict.")
    return convert_state_dict(loaded)


def convert_checkpoint(input_path: str | os.PathLike, output_path: str | os.PathLike) -> dict:
    """Converts a PyTorch FID-Inception .pth to .npz / .safetensors; returns a short summary.

    The output is checked against the network before it is written (`save_variables`).
    """
    flat = load_torch_checkpoint(input_path)
    save_variables(output_path, flat)
    return {
        "output": os.fspath(output_path),
        "tensors": len(flat),
        "parameters": int(
            sum(value.size for name, value in flat.items() if name.startswith("params/"))
        ),
        "include_fc": "params/fc/kernel" in flat,
    }


def expected_shapes(include_fc: bool = True) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of every variable of `InceptionV3(include_fc)`, without computing."""
    return dict(_expected_shapes(include_fc))


@functools.lru_cache(maxsize=2)
def _expected_shapes(include_fc: bool) -> dict[str, tuple[int, ...]]:
    abstract = jax.eval_shape(
        InceptionV3(include_fc=include_fc).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    flat = traverse_util.flatten_dict(abstract, sep="/")
    return {name: tuple(value.shape) for name, value in flat.items()}


def save_variables(path: str | os.PathLike, flat: Mapping[str, np.ndarray]) -> None:
    """Writes flat variables to .npz or .safetensors (by extension), atomically.

    The names and shapes are checked first (`check_variables`), so a written file always loads.
    """
    path = os.fspath(path)
    check_variables(flat, path)
    arrays = {name: np.ascontiguousarray(value, np.float32) for name, value in flat.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save

        files.write_atomically(path, save(arrays))
    elif path.endswith(".npz"):
        files.save_npz(path, **arrays)
    else:
        raise ValueError(f"{path}: the output name must end in .npz or .safetensors.")


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        try:
            from safetensors import SafetensorError
            from safetensors.numpy import load
        except ImportError as error:
            raise ImportError(
                f"Reading {path} needs the safetensors package (pip install safetensors), or "
                "convert the weights to .npz instead."
            ) from error
        try:
            return load(files.read_bytes(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise InceptionWeightsError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated. "
                "Re-run launch/convert_inception.py."
            ) from error
    with files.open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise InceptionWeightsError(
            f"{path} is not a readable .npz file (it is not a zip archive); it may be corrupt. "
            "Re-run launch/convert_inception.py."
        )
    try:
        return files.load_npz(path)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise InceptionWeightsError(
                f"{path} holds a pickled (object) array; refusing to unpickle it."
            ) from error
        raise InceptionWeightsError(f"{path} is not a readable .npz file ({error}).") from error
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InceptionWeightsError(
            f"{path} is not a readable .npz file ({type(error).__name__}: {error}); it may be "
            "truncated or corrupt. Re-run launch/convert_inception.py."
        ) from error


def check_variables(flat: Mapping[str, np.ndarray], source: str = "weights") -> bool:
    """Checks flat variables against the network; returns whether they include the classifier.

    Raises:
      InceptionWeightsError: naming missing, unexpected, mis-shaped or non-finite tensors.
    """
    include_fc = "params/fc/kernel" in flat or "params/fc/bias" in flat
    expected = expected_shapes(include_fc)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{source} does not match the FID Inception-V3: {len(missing)} missing tensors "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Convert "
            f"{FID_WEIGHTS_FILENAME} with launch/convert_inception.py."
        )
    for name, shape in expected.items():
        value = flat[name]
        if tuple(value.shape) != shape:
            raise InceptionWeightsError(
                f"{source}: {name} has shape {tuple(value.shape)}, the network needs {shape}."
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise InceptionWeightsError(f"{source}: {name} has dtype {value.dtype}, not float.")
        if not np.isfinite(value).all():
            raise InceptionWeightsError(f"{source}: {name} has non-finite values.")
    return include_fc


def load_variables(path: str | os.PathLike) -> tuple[dict, bool]:
    """Reads converted weights (.npz or .safetensors) and checks them against the network.

    Returns:
      (variables {"params": ..., "batch_stats": ...} of float32 jax arrays, include_fc).

    Raises:
      FileNotFoundError: no file at `path` (the message says how to make one).
      InceptionWeightsError: unreadable, corrupt, or not this network's weights.
    """
    path = os.fspath(path)
    if not files.isfile(path):
        raise FileNotFoundError(
            f"Inception weights {path} not found. Convert {FID_WEIGHTS_FILENAME} first: "
            "python -m launch.convert_inception --input=<.pth> --output=<.npz> "
            "(docs/evaluation.md)."
        )
    flat = _read_file(path)
    include_fc = check_variables(flat, path)
    arrays = {name: jnp.asarray(value, jnp.float32) for name, value in flat.items()}
    return traverse_util.unflatten_dict(arrays, sep="/"), include_fc
