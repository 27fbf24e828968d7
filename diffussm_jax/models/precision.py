"""One precision policy for every model: which dtype holds what.

    policy = Precision.parse("bfloat16")   # a named policy, or "compute=bfloat16,residual=..."
    model = models.create("DiT-XL/2", ..., precision=policy)

The four places a dtype matters, and the defaults of the named policies:

  params    stored parameters, hence gradients and optimizer state          float32
  compute   matmul inputs and the activations between them                  float32 | bfloat16
  residual  the stream carried from block to block (the sums x + gate * f)  float32
  ssm       the SSM's kernels, FFTs and state                               float32

A float32 residual stream keeps bfloat16 rounding from accumulating over the depth (DiT's
reference runs it so under autocast); bfloat16 halves what each block's input costs to keep.
XLA's FFT takes float32 or float64 only, so `ssm` is one of those; the chunked backend's matmul
operands follow `compute` (its state stays in `ssm`). The SSM's own parameters (dt, A, C, D) are
float32 whatever `params` says: few, and the dynamics are sensitive to rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16", "float64")
SSM_DTYPES = ("float32", "float64")


class PrecisionError(ValueError):
    """A policy names a dtype that cannot play its role."""


@dataclasses.dataclass(frozen=True)
class Precision:
    params: str = "float32"
    compute: str = "float32"
    residual: str = "float32"
    ssm: str = "float32"

    def __post_init__(self) -> None:
        for role in ("params", "compute", "residual"):
            if getattr(self, role) not in DTYPES:
                raise PrecisionError(
                    f"precision {role}={getattr(self, role)!r}; choose one of {DTYPES}."
                )
        if self.ssm not in SSM_DTYPES:
            raise PrecisionError(
                f"precision ssm={self.ssm!r}: XLA's FFT computes in float32 or float64 only; "
                f"choose one of {SSM_DTYPES} (bfloat16 activations are converted for the FFTs)."
            )

    @classmethod
    def parse(cls, text: str) -> Precision:
        """A named policy (`NAMED`) or comma-separated role=dtype pairs; unnamed roles keep the
        float32 default."""
        if text in NAMED:
            return NAMED[text]
        roles = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            role, _, dtype = item.partition("=")
            if role not in roles or not dtype:
                raise PrecisionError(
                    f"precision {text!r}: expected a named policy ({', '.join(NAMED)}) or "
                    f"ROLE=DTYPE pairs with ROLE in {sorted(roles)}, e.g. "
                    "'compute=bfloat16,residual=bfloat16'."
                )
            values[role] = dtype
        return cls(**values)

    @classmethod
    def from_config(cls, block: Any) -> Precision:
        """From a config block with the roles as fields; a role it lacks keeps its default."""
        return cls(**{f.name: block[f.name] for f in dataclasses.fields(cls) if f.name in block})

    @property
    def name(self) -> str:
        """The named policy's name, else role=dtype pairs for the roles off the default."""
        for name, policy in NAMED.items():
            if policy == self:
                return name
        default = Precision()
        return ",".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        )

    def describe(self) -> str:
        return (
            f"{self.name}: params {self.params}, compute {self.compute}, "
            f"residual stream {self.residual}, SSM {self.ssm}"
        )

    def model_fields(self, has_ssm: bool) -> dict[str, Any]:
        """Constructor fields of a DiffuSSM (`has_ssm`) or DiT for this policy."""
        fields = dict(
            param_dtype=jnp.dtype(self.params),
            dtype=jnp.dtype(self.compute),
            residual_dtype=jnp.dtype(self.residual),
        )
        if has_ssm:
            fields["ssm_dtype"] = jnp.dtype(self.ssm)
        return fields


NAMED: dict[str, Precision] = {
    "float32": Precision(),
    "bfloat16": Precision(compute="bfloat16"),
}
