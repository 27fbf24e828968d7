"""What configures an SSM (`SSMSettings`) and how its parameters travel between the pure
functions (`SSMParams`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

InitName = Literal["lin", "inv", "legs"]
INITS = ("lin", "inv", "legs")
Backend = Literal["fft", "scan", "chunked"]
BACKENDS = ("fft", "scan", "chunked")

# Chunk length T of the chunked backend: T MACs per element go to the Toeplitz matmul and 2N to
# the state, and L/T chunks to the sequential part; 64 was fastest from L = 8192 on, within noise
# of 32 below (docs/benchmarks/README.md, ssm.md).
DEFAULT_CHUNK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class SSMSettings:
    """How an S4D layer is initialised and applied (spec section 3).

    state_size: N, the state per channel (N/2 complex conjugate pairs); even, >= 2.
    init: A's initial modes, "lin" (S4D-Lin), "inv" (S4D-Inv) or "legs" (S4D-LegS).
    dt_min, dt_max: the range of the step size's log-uniform initialisation (BiGS: 0.01, 1).
    backend: "fft" (kernel + FFT convolution), "scan" (associative scan of the recurrence) or
      "chunked" (chunk_size-step Toeplitz and state matmuls); same parameters, same function.
    chunk_size: T of the chunked backend.

    Frozen (hashable), so Linen modules take it as a field.
    """

    state_size: int = 64
    init: InitName = "lin"
    dt_min: float = 0.001
    dt_max: float = 0.1
    backend: Backend = "fft"
    chunk_size: int = DEFAULT_CHUNK_SIZE


# An SSM's parameters as the pure functions take them: log_dt (H,), a (H, N/2) complex,
# c (H, N/2) complex, d (H,).
SSMParams = tuple[jax.Array, jax.Array, jax.Array, jax.Array]
