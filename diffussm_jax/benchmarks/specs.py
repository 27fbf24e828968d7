"""What is benchmarked: a registry model plus constructor overrides, and its table label.

There is one naming scheme, the registry's (`models.names()`: "DiffuSSM-XL", "DiT-XL/2"). A
benchmarked model is a registry name plus the fields it overrides, and its label is derived from
the two: resized models (width, depth) drop the size and keep the family, a patch override adds
" p<patch>", an SSM backend adds " [<backend>]":

    DiffuSSM-S, hidden_size=256, depth=2, ssm.backend=fft      -> "DiffuSSM [fft]"
    DiffuSSM-XL, ssm.backend=chunked                           -> "DiffuSSM-XL [chunked]"
    DiT-S/2, hidden_size=256, depth=2, num_heads=4, patch_size=1 -> "DiT p1"
    DiT-XL/2                                                   -> "DiT-XL/2"

The command line names the same models as "DiffuSSM" and "DiT/<patch>" (at --width, --depth)
or a registry name; `model_specs` turns those into specs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from diffussm_jax import models, ssm

# The registry entries that the resized "DiffuSSM" / "DiT/<patch>" models start from; every
# field that tells them apart from these is overridden.
RESIZED_BASE = {"DiffuSSM": "DiffuSSM-S", "DiT": "DiT-S/2"}
_SIZE_FIELDS = ("hidden_size", "depth")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a registry name plus constructor overrides (hashable pairs)."""

    registry_name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """The model's name in tables: the registry name, adjusted by the overridden fields."""
        fields = dict(self.overrides)
        family = self.registry_name.split("-")[0]
        label = family if any(f in fields for f in _SIZE_FIELDS) else self.registry_name
        if "patch_size" in fields:
            label += f" p{fields['patch_size']}"
        if "ssm.backend" in fields:
            label += f" [{fields['ssm.backend']}]"
        return label

    @property
    def backend(self) -> str:
        return dict(self.overrides).get("ssm.backend", "-")

    @property
    def is_diffussm(self) -> bool:
        return self.registry_name in models.DIFFUSSM_VARIANTS

    @property
    def patch_size(self) -> int:
        registered = models.DIT_VARIANTS.get(self.registry_name, {}).get("patch_size", 1)
        return dict(self.overrides).get("patch_size") or registered

    def tokens(self, input_size: int) -> int:
        """Length of the sequence the token mixer sees: L for DiffuSSM's SSM, T for DiT."""
        return (input_size // (1 if self.is_diffussm else self.patch_size)) ** 2

    def build(self, input_size: int, precision: str, scan_layers: bool, **overrides) -> nn.Module:
        """The Linen model at this latent side; `overrides` go on top of the spec's own.

        "ssm.backend" sets the backend of the model's `ssm.SSMSettings`, keeping its others.
        """
        fields = {**dict(self.overrides), **overrides}
        backend = fields.pop("ssm.backend", None)
        model = models.create(
            self.registry_name,
            input_size=input_size,
            in_channels=4,
            num_classes=1000,
            precision=models.Precision.parse(precision),
            scan_layers=scan_layers,
            **fields,
        )
        if backend is None:
            return model
        return model.clone(ssm=dataclasses.replace(model.ssm, backend=backend))


def model_specs(
    names: Sequence[str], backends: Sequence[str], width: int, depth: int
) -> list[ModelSpec]:
    """'DiffuSSM', 'DiT/<patch>' (at width and depth) or registry names -> ModelSpecs.

    Every DiffuSSM entry is expanded over `backends`. DiT gets 64-channel heads, as DiT-B..XL.
    """
    specs = []
    for name in names:
        if name == "DiffuSSM" or name in models.DIFFUSSM_VARIANTS:
            size = dict(hidden_size=width, depth=depth) if name == "DiffuSSM" else {}
            registry_name = RESIZED_BASE.get(name, name)
            for backend in backends:
                if backend not in ssm.BACKENDS:
                    raise ValueError(f"unknown backend {backend!r}; choose from {ssm.BACKENDS}.")
                overrides = tuple({**size, "ssm.backend": backend}.items())
                specs.append(ModelSpec(registry_name, overrides))
        elif name.startswith("DiT/"):
            patch = int(name.removeprefix("DiT/"))
            overrides = dict(
                hidden_size=width, depth=depth, num_heads=max(1, width // 64), patch_size=patch
            )
            specs.append(ModelSpec(RESIZED_BASE["DiT"], tuple(overrides.items())))
        elif name in models.names():
            specs.append(ModelSpec(name))
        else:
            raise ValueError(
                f"unknown model {name!r}: use 'DiffuSSM', 'DiT/<patch>' or a registry name "
                f"({', '.join(models.names())})."
            )
    return specs
