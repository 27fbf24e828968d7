"""What a benchmark run is asked for (`Options`) and what it returns (`Row`s)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from diffussm_jax import ssm

# One measurement: column name -> value; a mode returns a list of them, a report writes them.
Row = dict[str, Any]
MODES = ("models", "throughput", "scaling", "ssm")


@dataclasses.dataclass
class Options:
    """Every knob of every mode. Defaults size the CPU runs to minutes on 2 cores."""

    mode: str = "throughput"
    out_dir: str = "docs/benchmarks"
    command: str = ""  # recorded in every row; the launcher passes its command line
    # Models: "DiffuSSM" and "DiT/<patch>" at (width, depth), or registry names ("DiT-XL/2");
    # see `specs.model_specs`.
    models: Sequence[str] = ("DiffuSSM", "DiT/1", "DiT/2")
    backends: Sequence[str] = ("fft", "chunked")  # expands every DiffuSSM entry
    width: int = 256
    depth: int = 2
    # A named policy ("float32", "bfloat16") or role=dtype pairs (models.precision).
    precision: str = "float32"
    input_sizes: Sequence[int] = (32,)  # latent side; L = input_size ** 2
    batch_sizes: Sequence[int] = (8,)  # descending: the largest that fits is used
    repeats: int = 3
    time_budget_s: float = 30.0  # stop repeating a measurement after this long
    memory_cap_gb: float | None = None  # default: device limit, else 8 GiB on CPU
    scan_layers: bool = False
    train_only: bool = False
    interleave: bool = True  # time all configurations round-robin (shared CPUs); see time_all
    matmul_size: int | None = None  # default 2048 on CPU, 8192 on accelerators
    # ssm mode
    lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384)
    state_size: int = 64
    chunk_sizes: Sequence[int] = (ssm.DEFAULT_CHUNK_SIZE,)
    kernel_memory: bool = True
    # models mode: registry overrides (tests shrink depth)
    registry_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # scaling mode: exponent fitted over this range of L
    fit_range: tuple[int, int] = (1024, 16384)
