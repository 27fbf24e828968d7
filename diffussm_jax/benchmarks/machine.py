"""The machine a benchmark runs on: its description, memory limit, nominal peak and load."""

from __future__ import annotations

import os

import jax

from diffussm_jax.benchmarks.options import Options
from diffussm_jax.parallel import host_allocator

# Dense bf16 peak (FLOP/s, no sparsity) of accelerators whose MFU is usually quoted against it.
# Matched by substring of jax's device_kind; the measured matmul rate is reported regardless.
NOMINAL_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def machine_description() -> str:
    """'cpu (cpu), 2 CPU cores (AMD EPYC), host malloc: freed memory retained' / 'gpu (NVIDIA
    H100 80GB HBM3), 16 CPU cores (...)'; device 0 is used. The host's processor is named where
    the OS says it: two 2-core hosts differed 3-5x in loaded matmul rate (docs/benchmarks). On
    CPU the host allocator's settings move step times by up to 2x
    (parallel/host_allocator.py), so they are part of the description."""
    device = jax.devices()[0]
    text = f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores"
    model = cpu_model()
    if model:
        text += f" ({model})"
    if device.platform == "cpu":
        text += f", host malloc: {host_allocator.describe()}"
    return text


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first 'model name' in Linux's cpuinfo, or None where there is none."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        return None
    return None


def device_memory_limit() -> int | None:
    """Bytes the first device may allocate, or None where jax does not say (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def memory_cap_bytes(options: Options) -> int:
    """Bytes a configuration may be predicted to need: the option, else 90% of the device's."""
    if options.memory_cap_gb is not None:
        return int(options.memory_cap_gb * 2**30)
    limit = device_memory_limit()
    return int(0.9 * limit) if limit else 8 * 2**30


def nominal_peak(dtype: str) -> float | None:
    """The vendor's dense FLOP/s of device 0 in `dtype`, where known (bf16 accelerators)."""
    kind = jax.devices()[0].device_kind
    if dtype != "bfloat16":
        return None
    for name, peak in NOMINAL_BF16_PEAK.items():
        if name in kind:
            return peak
    return None


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none): how shared the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
