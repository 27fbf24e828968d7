"""Model registry: paper names ("DiffuSSM-XL", "DiT-XL/2") -> Linen modules.

    model = models.create("DiffuSSM-XL", input_size=32, in_channels=4, num_classes=1000)
    out = model.apply(variables, x, t, y)           # x (B, H, W, C) -> (B, H, W, C_out)

`stats(name, input_size=...)` reports parameters and forward MACs without materialising weights.

    attention.py  the DiT baseline's self-attention (memory-lean custom VJP, XLA, cuDNN)
    diffussm.py   the DiffuSSM block (hourglass + gated bidirectional SSM) and model
    dit.py        the DiT baseline (patchify, adaLN-Zero attention blocks)
    layers.py     shared layers: embedders, adaLN, Dense with logical axes, label dropout,
                  lean-gradient GELU / LayerNorm, remat policies
    precision.py  `Precision`: the dtypes of parameters, compute, residual stream and SSM
The S4D layers themselves are `diffussm_jax.ssm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffussm_jax import ssm
from diffussm_jax.models.diffussm import DiffuSSM, DiffuSSMBlock
from diffussm_jax.models.dit import DIT_VARIANTS, DiT
from diffussm_jax.models.precision import Precision, PrecisionError

# Depths for S/B/L are our choice (the paper names only the width); see the spec, section 4.
DIFFUSSM_VARIANTS: dict[str, dict[str, Any]] = {
    "DiffuSSM-S": dict(hidden_size=384, depth=12),
    "DiffuSSM-B": dict(hidden_size=768, depth=12),
    "DiffuSSM-L": dict(hidden_size=768, depth=24),
    "DiffuSSM-XL": dict(hidden_size=1152, depth=29),
}

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{name: (DiffuSSM, kwargs) for name, kwargs in DIFFUSSM_VARIANTS.items()},
    **{name: (DiT, kwargs) for name, kwargs in DIT_VARIANTS.items()},
}

# Figures reported by the papers (DiffuSSM Tables 1-2, DiT Table 4), for side-by-side tables.
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "DiffuSSM-XL": {"params_m": 673.0, "gmacs_256": 280.0, "gmacs_512": 1066.0},
    "DiT-S/8": {"params_m": 33.0, "gmacs_256": 0.36},
    "DiT-S/4": {"params_m": 33.0, "gmacs_256": 1.41},
    "DiT-S/2": {"params_m": 33.0, "gmacs_256": 6.06},
    "DiT-B/8": {"params_m": 130.0, "gmacs_256": 1.42},
    "DiT-B/4": {"params_m": 130.0, "gmacs_256": 5.56},
    "DiT-B/2": {"params_m": 130.0, "gmacs_256": 23.01},
    "DiT-L/8": {"params_m": 458.0, "gmacs_256": 5.01},
    "DiT-L/4": {"params_m": 458.0, "gmacs_256": 19.70},
    "DiT-L/2": {"params_m": 458.0, "gmacs_256": 80.71},
    "DiT-XL/8": {"params_m": 675.0, "gmacs_256": 7.39},
    "DiT-XL/4": {"params_m": 675.0, "gmacs_256": 29.05},
    "DiT-XL/2": {"params_m": 675.0, "gmacs_256": 118.64, "gmacs_512": 524.60},
}


class ModelFieldError(ValueError):
    """A constructor field the named model does not have (e.g. num_heads for a DiffuSSM)."""


def names() -> list[str]:
    """All registered model names."""
    return list(_REGISTRY)


def model_class(name: str) -> type[nn.Module]:
    """The Linen class of a registered model, e.g. DiffuSSM for "DiffuSSM-XL"."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}.")
    return _REGISTRY[name][0]


def constructor_fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
    """The dataclass fields of a model class that its constructor takes (not Linen's own)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def create(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    precision: Precision | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model; `overrides` replace any constructor field (e.g. depth=2, or
    ssm=ssm.SSMSettings(state_size=16) for a DiffuSSM).

    Args:
      name: a registry name, see `names()`.
      input_size: latent (or pixel) height = width.
      in_channels: C of x (4 for Stable Diffusion latents).
      num_classes: number of classes (0: unconditional); label `num_classes` is the null label.
      learn_sigma: output 2C channels (noise + variance interpolation) instead of C.
      precision: the dtypes of parameters, compute, residual stream and SSM (`Precision`);
        unset: the constructor's defaults (float32 throughout) or the dtypes in `overrides`.

    Raises:
      ModelFieldError: an override names a field the model's class does not have.
    """
    cls, kwargs = model_class(name), _REGISTRY[name][1]
    fields = constructor_fields(cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ModelFieldError(
            f"{name} ({cls.__name__}) has no field(s) {unknown}; valid fields: {sorted(fields)}."
        )
    if precision is not None:
        overrides = {**precision.model_fields(has_ssm=cls is DiffuSSM), **overrides}
    kwargs = {**kwargs, **overrides}
    return cls(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        **kwargs,
    )


def example_inputs(model: nn.Module, batch_size: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (x, t, y) for `model`, for eval_shape / lowering."""
    x = jax.ShapeDtypeStruct(
        (batch_size, model.input_size, model.input_size, model.in_channels), jnp.float32
    )
    t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return x, t, y


def abstract_params(model: nn.Module) -> Any:
    """The model's parameter tree as ShapeDtypeStructs (unboxed), without allocating them."""
    variables = jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model))
    return nn.meta.unbox(variables)["params"]


def count_params(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def parameter_table(params: Any, depth: int = 1) -> str:
    """A text table of parameter counts per module, `depth` levels down the tree, with shares.

    `params`: a parameter tree (boxed or not, arrays or ShapeDtypeStructs). Stacked layers
    (`scan_layers`) count all layers under one name, e.g. `blocks`.

        print(models.parameter_table(variables["params"]))            # the model's parts
        print(models.parameter_table(params["blocks_0"], depth=2))    # inside one block
    """
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    if not flat:
        raise ValueError("parameter_table: the tree holds no parameters.")
    counts: dict[str, int] = {}
    shapes: dict[str, list[str]] = {}
    for path, leaf in flat.items():
        # The module path (the leaf's parents), cut at `depth`; a top-level leaf is its own row.
        name = "/".join(path[:-1][:depth]) or path[-1]
        counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape))
        shape = "x".join(map(str, leaf.shape)) or "scalar"
        shapes.setdefault(name, []).append(f"{'/'.join(path[len(name.split('/')) :])} {shape}")
    total = sum(counts.values())
    width = max(len("total"), *(len(name) for name in counts))
    lines = [f"{'module':<{width}}  {'parameters':>12}  {'share':>6}  shapes"]
    for name, count in counts.items():
        leaves = shapes[name]
        # Shapes of a module's own few tensors; a larger subtree gets its tensor count only.
        direct = len(leaves) <= 5 and not any("/" in leaf.split(" ")[0] for leaf in leaves)
        shown = ", ".join(leaves) if direct else f"{len(leaves)} tensors"
        lines.append(f"{name:<{width}}  {count:>12,}  {count / total:>6.1%}  {shown}")
    lines.append(f"{'total':<{width}}  {total:>12,}  {1:>6.1%}")
    return "\n".join(lines)


def _forward_gmacs(fn, *args) -> float:
    """Multiply-accumulates of a function from XLA's cost analysis of its lowering (flops / 2)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float(cost["flops"]) / 2e9


def stats(name: str, *, input_size: int, in_channels: int = 4, **overrides: Any) -> dict[str, Any]:
    """Parameters and forward GMACs (per example) of a registered model, abstractly.

    GMACs are XLA's flop count of the lowered forward pass divided by two (DiT counts
    multiply-accumulates). XLA counts every arithmetic op, so elementwise work (norms,
    activations, the FFTs) is included; `breakdown` separates it per part.

    Returns a dict with `params`, `forward_gmacs`, and `params_breakdown` / `gmacs_breakdown`.
    """
    overrides = {"num_classes": 1000, **overrides, "scan_layers": False}
    model = create(name, input_size=input_size, in_channels=in_channels, **overrides)
    params = abstract_params(model)
    x, t, y = example_inputs(model)

    def forward(m):
        return lambda p, x, t, y: m.apply({"params": p}, x, t, y)

    total = _forward_gmacs(forward(model), params, x, t, y)
    shallow = model.clone(depth=0)
    outside_blocks = _forward_gmacs(forward(shallow), abstract_params(shallow), x, t, y)

    params_breakdown: dict[str, int] = {}
    for key, subtree in params.items():
        group = "blocks" if key.startswith("blocks") else key
        params_breakdown[group] = params_breakdown.get(group, 0) + count_params(subtree)
    gmacs_breakdown = {"blocks": total - outside_blocks, "embedders_and_final": outside_blocks}

    if isinstance(model, DiffuSSM):
        block_params = params["blocks_0"]
        ssm_params = count_params(block_params["ssm"])
        ada_params = count_params(block_params["adaLN_modulation"])
        params_breakdown["blocks.dense"] = model.depth * (
            count_params(block_params) - ssm_params - ada_params
        )
        params_breakdown["blocks.adaLN"] = model.depth * ada_params
        params_breakdown["blocks.ssm"] = model.depth * ssm_params
        seq_len = input_size * input_size
        bissm = ssm.BidirectionalSSM(model.hidden_size, model.ssm)
        u = jax.ShapeDtypeStruct((1, seq_len, model.hidden_size), jnp.float32)
        ssm_vars = jax.eval_shape(bissm.init, jax.random.key(0), u)
        gmacs_breakdown["blocks.ssm"] = model.depth * _forward_gmacs(
            lambda v, u: bissm.apply(v, u), nn.meta.unbox(ssm_vars), u
        )
        gmacs_breakdown["blocks.dense_formula"] = (
            7.5 * seq_len * model.hidden_size**2 * model.depth / 1e9
            if model.hourglass_ratio == 2
            else None
        )
    return dict(
        name=name,
        input_size=input_size,
        params=count_params(params),
        forward_gmacs=total,
        params_breakdown=params_breakdown,
        gmacs_breakdown=gmacs_breakdown,
        paper=PAPER_FIGURES.get(name, {}),
    )


__all__ = [
    "DIFFUSSM_VARIANTS",
    "DIT_VARIANTS",
    "PAPER_FIGURES",
    "DiT",
    "DiffuSSM",
    "DiffuSSMBlock",
    "ModelFieldError",
    "Precision",
    "PrecisionError",
    "abstract_params",
    "constructor_fields",
    "count_params",
    "create",
    "model_class",
    "names",
    "stats",
]
