"""Reading (and writing) AutoencoderKL weights in diffusers' layout, with numpy and safetensors.

A diffusers VAE directory (e.g. a download of huggingface.co/stabilityai/sd-vae-ft-ema) holds

    config.json                          the architecture (block widths, groups, latent channels)
    diffusion_pytorch_model.safetensors  the weights, PyTorch layouts, float32 (float16 and
                                         bfloat16 files are upcast to float32 on load, exactly)

    model, params = load(directory)      # AutoencoderKL, Flax parameter tree (float32 numpy)

The directory may be local or in a bucket (`gs://...`, read through `diffussm_jax.files`).

The key mapping is explicit: `key_map(config)` lists every diffusers key the architecture has and
where it goes in the Flax tree, and how it is transposed:

    conv    (O, I, kH, kW) -> kernel (kH, kW, I, O)
    linear  (O, I)         -> kernel (I, O)    (older checkpoints store attention projections as
                                               1x1 convs, (O, I, 1, 1); those are squeezed)
    norm    weight / bias  -> scale / bias
    bias    (O,)           -> bias

Checkpoints written by diffusers before 0.14 name the mid-block attention projections
`query` / `key` / `value` / `proj_attn`; they are renamed to `to_q` / `to_k` / `to_v` /
`to_out.0` on load. The original CompVis / LDM layout (`encoder.down.0.block.0...`) is
recognised and refused with instructions. Any missing, unexpected or mis-shaped key is an error
that names the keys. PyTorch is never imported.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from diffussm_jax import files
from diffussm_jax.vae.autoencoder import AutoencoderKL, VAEConfig, param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DOWNLOAD_HINT = (
    "Download the diffusers files of the VAE, e.g. for the paper's VAE:\n"
    "  huggingface-cli download stabilityai/sd-vae-ft-ema config.json "
    "diffusion_pytorch_model.safetensors --local-dir <dir>\n"
    "(see docs/latents.md)."
)
# diffusers < 0.14 names of the mid-block attention projections -> current names.
LEGACY_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}

FlaxPath = tuple[str, ...]
# The safetensors dtypes VAE weights may be stored in; each upcasts exactly to float32.
FLOAT_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class VAEWeightsError(ValueError):
    """The VAE files are corrupt or do not match the architecture (the message names the keys)."""


class VAEWeightsNotFoundError(FileNotFoundError):
    """The VAE directory or one of its files is missing."""


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_diffusers(raw: dict[str, Any], source: str = "config.json") -> VAEConfig:
    """diffusers' AutoencoderKL config dict -> VAEConfig; refuses architectures we do not port."""
    name = raw.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise VAEWeightsError(f"{source}: _class_name is {name!r}; only AutoencoderKL is ported.")
    if raw.get("act_fn", "silu") != "silu":
        raise VAEWeightsError(f"{source}: act_fn={raw['act_fn']!r}; only 'silu' is ported.")
    widths = tuple(int(w) for w in raw.get("block_out_channels", (64,)))
    for field, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = raw.get(field, [block] * len(widths))
        if list(types) != [block] * len(widths):
            raise VAEWeightsError(
                f"{source}: {field}={types}; only {len(widths)} x {block!r} is ported."
            )
    return VAEConfig(
        in_channels=int(raw.get("in_channels", 3)),
        out_channels=int(raw.get("out_channels", 3)),
        latent_channels=int(raw.get("latent_channels", 4)),
        block_out_channels=widths,
        layers_per_block=int(raw.get("layers_per_block", 1)),
        norm_num_groups=int(raw.get("norm_num_groups", 32)),
        # Absent (or null) in older configs: diffusers then uses the convs.
        use_quant_conv=raw.get("use_quant_conv") is not False,
        use_post_quant_conv=raw.get("use_post_quant_conv") is not False,
        mid_block_add_attention=raw.get("mid_block_add_attention") is not False,
        scaling_factor=float(raw.get("scaling_factor", 0.18215)),
    )


def config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """VAEConfig -> a config.json dict that diffusers' AutoencoderKL.from_pretrained accepts."""
    blocks = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
        "scaling_factor": config.scaling_factor,
    }


# ---------------------------------------------------------------------------------------------
# The key mapping


def key_map(config: VAEConfig) -> dict[str, tuple[FlaxPath, str]]:
    """Every diffusers state-dict key of `config` -> (Flax parameter path, transform kind).

    Kinds: "conv", "linear", "norm_scale", "bias" (see the module docstring).
    """
    mapping: dict[str, tuple[FlaxPath, str]] = {}

    def conv(torch_prefix: str, flax_path: FlaxPath):
        mapping[f"{torch_prefix}.weight"] = ((*flax_path, "kernel"), "conv")
        mapping[f"{torch_prefix}.bias"] = ((*flax_path, "bias"), "bias")

    def linear(torch_prefix: str, flax_path: FlaxPath):
        mapping[f"{torch_prefix}.weight"] = ((*flax_path, "kernel"), "linear")
        mapping[f"{torch_prefix}.bias"] = ((*flax_path, "bias"), "bias")

    def norm(torch_prefix: str, flax_path: FlaxPath):
        mapping[f"{torch_prefix}.weight"] = ((*flax_path, "scale"), "norm_scale")
        mapping[f"{torch_prefix}.bias"] = ((*flax_path, "bias"), "bias")

    def resnet(torch_prefix: str, flax_path: FlaxPath, shortcut: bool):
        for name in ("norm1", "norm2"):
            norm(f"{torch_prefix}.{name}", (*flax_path, name))
        for name in ("conv1", "conv2") + (("conv_shortcut",) if shortcut else ()):
            conv(f"{torch_prefix}.{name}", (*flax_path, name))

    def mid_block(torch_prefix: str, flax_path: FlaxPath):
        for j in range(2):
            resnet(f"{torch_prefix}.resnets.{j}", (*flax_path, f"resnets_{j}"), shortcut=False)
        if config.mid_block_add_attention:
            attention, flax_attention = f"{torch_prefix}.attentions.0", (*flax_path, "attentions_0")
            norm(f"{attention}.group_norm", (*flax_attention, "group_norm"))
            for name in ("to_q", "to_k", "to_v"):
                linear(f"{attention}.{name}", (*flax_attention, name))
            linear(f"{attention}.to_out.0", (*flax_attention, "to_out_0"))

    widths = config.block_out_channels
    last = len(widths) - 1

    # Encoder: widths ascending; the first ResnetBlock of a block changes the width.
    conv("encoder.conv_in", ("encoder", "conv_in"))
    width_in = widths[0]
    for i, width in enumerate(widths):
        block, flax_block = f"encoder.down_blocks.{i}", ("encoder", f"down_blocks_{i}")
        for j in range(config.layers_per_block):
            resnet(
                f"{block}.resnets.{j}", (*flax_block, f"resnets_{j}"), j == 0 and width_in != width
            )
        if i < last:
            conv(f"{block}.downsamplers.0.conv", (*flax_block, "downsamplers_0", "conv"))
        width_in = width
    mid_block("encoder.mid_block", ("encoder", "mid_block"))
    norm("encoder.conv_norm_out", ("encoder", "conv_norm_out"))
    conv("encoder.conv_out", ("encoder", "conv_out"))

    # Decoder: widths descending, one more ResnetBlock per block.
    conv("decoder.conv_in", ("decoder", "conv_in"))
    mid_block("decoder.mid_block", ("decoder", "mid_block"))
    width_in = widths[-1]
    for i, width in enumerate(widths[::-1]):
        block, flax_block = f"decoder.up_blocks.{i}", ("decoder", f"up_blocks_{i}")
        for j in range(config.layers_per_block + 1):
            resnet(
                f"{block}.resnets.{j}", (*flax_block, f"resnets_{j}"), j == 0 and width_in != width
            )
        if i < last:
            conv(f"{block}.upsamplers.0.conv", (*flax_block, "upsamplers_0", "conv"))
        width_in = width
    norm("decoder.conv_norm_out", ("decoder", "conv_norm_out"))
    conv("decoder.conv_out", ("decoder", "conv_out"))

    if config.use_quant_conv:
        conv("quant_conv", ("quant_conv",))
    if config.use_post_quant_conv:
        conv("post_quant_conv", ("post_quant_conv",))
    return mapping


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    if kind == "linear":
        if array.ndim == 4:  # attention stored as a 1x1 conv
            array = array[:, :, 0, 0]
        return array.T
    return array


def _to_torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv":
        height, width, fan_in, fan_out = flax_shape
        return (fan_out, fan_in, height, width)
    if kind == "linear":
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _rename_legacy(key: str) -> str:
    """Maps diffusers < 0.14 attention names (`...attentions.0.query.weight`) to current ones."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-3] == "0" and parts[-4:-3] == ["attentions"]:
        new = LEGACY_ATTENTION_NAMES.get(parts[-2])
        if new is not None:
            return ".".join([*parts[:-2], new, parts[-1]])
    return key


def _get_path(tree: dict, path: FlaxPath):
    for name in path:
        tree = tree[name]
    return tree


def _set_path(tree: dict, path: FlaxPath, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {len(items)} {title}:\n    {shown}{more}"


def convert_state_dict(
    state_dict: dict[str, np.ndarray], config: VAEConfig, source: str = "state dict"
) -> dict[str, Any]:
    """diffusers state dict (numpy, PyTorch layouts) -> Flax params of `AutoencoderKL(config)`.

    Raises:
      VAEWeightsError: naming every missing, unexpected and mis-shaped key (and non-finite ones).
    """
    if any(
        key.startswith(("encoder.down.", "decoder.up.")) or ".mid.attn_1." in key
        for key in state_dict
    ):
        raise VAEWeightsError(
            f"{source} is in the original CompVis/LDM layout (keys 'encoder.down.0.block...'), "
            "not diffusers'. Use the diffusers files (config.json + "
            f"{WEIGHTS_NAME}) of the same VAE.\n{DOWNLOAD_HINT}"
        )
    renamed = {_rename_legacy(key): key for key in state_dict}
    mapping = key_map(config)
    shapes = param_shapes(config)
    missing = sorted(set(mapping) - set(renamed))
    unexpected = sorted(renamed[key] for key in set(renamed) - set(mapping))
    misshaped, nonfinite = [], []
    params: dict[str, Any] = {}
    for key in sorted(set(mapping) & set(renamed)):
        path, kind = mapping[key]
        array = np.asarray(state_dict[renamed[key]])
        expected = _to_torch_shape(_get_path(shapes, path).shape, kind)
        ok_shapes = {expected}
        if kind == "linear":
            ok_shapes.add((*expected, 1, 1))
        if array.shape not in ok_shapes:
            misshaped.append(f"{renamed[key]}: {array.shape} in the file, {expected} expected")
            continue
        array = _to_flax(array.astype(np.float32), kind)
        if not np.isfinite(array).all():
            nonfinite.append(renamed[key])
        _set_path(params, path, np.ascontiguousarray(array))
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing keys (in the architecture, not in the weights)", missing),
            ("unexpected keys (in the weights, not in the architecture)", unexpected),
            ("mis-shaped keys", misshaped),
            ("keys with NaN or Inf values (corrupt weights?)", nonfinite),
        )
        if items
    ]
    if problems:
        raise VAEWeightsError(
            f"{source} does not match the AutoencoderKL architecture {config}:\n"
            + "\n".join(problems)
            + "\nIs config.json from the same model as the weights?"
        )
    return params


def flax_to_state_dict(params: dict[str, Any], config: VAEConfig) -> dict[str, np.ndarray]:
    """Inverse of `convert_state_dict`: Flax params -> diffusers state dict (numpy float32)."""
    state_dict = {}
    for key, (path, kind) in key_map(config).items():
        array = np.asarray(_get_path(params, path), np.float32)
        if kind == "conv":
            array = array.transpose(3, 2, 0, 1)
        elif kind == "linear":
            array = array.T
        state_dict[key] = np.ascontiguousarray(array)
    return state_dict


# ---------------------------------------------------------------------------------------------
# Files


def _safetensors():
    try:
        import safetensors  # optional dependency, needed only here
        import safetensors.numpy
    except ImportError as error:
        raise ImportError(
            "Reading VAE weights needs the `safetensors` package (no PyTorch): "
            "pip install safetensors"
        ) from error
    return safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays in their stored dtype.

    float16 and bfloat16 files (halves of the float32 originals, as often published) are read
    as such and logged; `convert_state_dict` upcasts them to float32, which is exact.

    Raises:
      VAEWeightsNotFoundError: no such file.
      VAEWeightsError: the file is truncated or corrupt, or holds non-float tensors.
    """
    if not files.isfile(path):
        raise VAEWeightsNotFoundError(f"VAE weights file {path} does not exist.\n{DOWNLOAD_HINT}")
    safetensors = _safetensors()
    payload = files.read_bytes(path)
    try:
        # The header is checked against the payload (sizes, offsets, dtypes) here; the dtype
        # table is ours, since numpy itself has no bfloat16 (ml_dtypes provides it).
        tensors = safetensors.deserialize(payload)
    except Exception as error:  # safetensors raises its own error types for bad headers/sizes
        raise VAEWeightsError(
            f"{path} ({len(payload)} bytes) is not a readable safetensors file: {error}. It is "
            "probably truncated or corrupt (an interrupted download?); download it again.\n"
            f"{DOWNLOAD_HINT}"
        ) from error
    stored = collections.Counter(info["dtype"] for _, info in tensors)
    unsupported = sorted(set(stored) - set(FLOAT_DTYPES))
    if unsupported:
        raise VAEWeightsError(
            f"{path} holds tensors of dtype {unsupported}; VAE weights are floating point "
            f"({sorted(FLOAT_DTYPES)}). Is this the VAE's diffusers weights file?"
        )
    halves = [name for name in ("F16", "BF16") if stored[name]]
    if halves:
        counts = ", ".join(f"{stored[n]} tensors in {FLOAT_DTYPES[n].name}" for n in halves)
        logging.info("VAE weights %s: %s; upcast to float32 on load (exact).", path, counts)
    return {
        name: np.frombuffer(info["data"], FLOAT_DTYPES[info["dtype"]]).reshape(info["shape"])
        for name, info in tensors
    }


def read_config(directory: str) -> VAEConfig:
    path = files.join(directory, CONFIG_NAME)
    if not files.isfile(path):
        raise VAEWeightsNotFoundError(f"{path} does not exist.\n{DOWNLOAD_HINT}")
    try:
        raw = json.loads(files.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VAEWeightsError(f"{path} is not valid JSON ({error}); download it again.") from error
    return config_from_diffusers(raw, source=path)


def load(directory: str | os.PathLike) -> tuple[AutoencoderKL, dict[str, Any]]:
    """A diffusers AutoencoderKL directory -> (AutoencoderKL module, Flax params as numpy).

    Raises:
      VAEWeightsNotFoundError: the directory, config.json or the safetensors file is missing.
      VAEWeightsError: a file is corrupt or the weights do not fit config.json (names the keys).
    """
    directory = os.fspath(directory)
    if not files.isdir(directory):
        raise VAEWeightsNotFoundError(
            f"VAE directory {directory!r} (config.vae.path) does not exist.\n{DOWNLOAD_HINT}"
        )
    weights = files.join(directory, WEIGHTS_NAME)
    if not files.isfile(weights):
        present = files.listdir(directory)
        pickled = [name for name in present if name.endswith((".bin", ".ckpt", ".pt"))]
        hint = (
            f" It holds {pickled}: pickled PyTorch files are not read here (they need torch and "
            "can run code); use the .safetensors file of the same model."
            if pickled
            else ""
        )
        raise VAEWeightsNotFoundError(
            f"{weights} does not exist (the directory holds {present}).{hint}\n{DOWNLOAD_HINT}"
        )
    config = read_config(directory)
    params = convert_state_dict(read_safetensors(weights), config, source=weights)
    return AutoencoderKL(config), params


def save(directory: str | os.PathLike, config: VAEConfig, params: dict[str, Any]) -> None:
    """Writes config.json + diffusion_pytorch_model.safetensors that diffusers can load."""
    directory = os.fspath(directory)
    files.write_atomically(
        files.join(directory, CONFIG_NAME), json.dumps(config_to_diffusers(config), indent=2)
    )
    payload = _safetensors().numpy.save(flax_to_state_dict(params, config))
    files.write_atomically(files.join(directory, WEIGHTS_NAME), payload)
