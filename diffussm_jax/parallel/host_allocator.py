"""Host-memory allocation for CPU runs: keep freed buffers in the process instead of returning
them to the kernel.

XLA:CPU and PyTorch allocate their buffers with glibc's malloc. glibc serves a request of more
than 32 MiB (or more than a thread arena's 64 MiB heap) with a fresh `mmap` and unmaps it on
free, so every large buffer of every step is new memory: the kernel zeroes and maps it page by
page on first touch. A DiffuSSM-S train step at batch 8 (32x32 latents) made 0.85 million such
page faults (3.4 GB of 4 KiB pages) and spent 2-3 s of system time on them out of a 4.4-5.7 s
step. With the three settings below the step reuses its memory (about 15 000 faults, 0.3 s of
system time, the same 5.1 GB peak resident memory); docs/benchmarks (2026-12-07) has the step
times with and without them.

  arena_max=1          one arena, whose heap grows without the 64 MiB cap of thread arenas
  mmap_max=0           no request goes to mmap
  trim_threshold=1 TiB free memory at the top of the heap is never handed back

glibc reads these tunables only at start-up, so `retain_freed_memory` sets GLIBC_TUNABLES and
re-executes the program once (the launchers call it first thing; it costs one more interpreter
start and imports, about 3 s). It does nothing when an accelerator plugin is installed (the
host then only stages data), when the C library is not glibc, when the user already set glibc
malloc tunables or MALLOC_* variables, or when DIFFUSSM_HOST_MALLOC=system asks for glibc's
defaults. The cost: memory the process freed stays counted in its resident set.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Mapping

TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=" + str(
    1 << 40
)
MARKER = "DIFFUSSM_HOST_MALLOC"  # "retained" once applied; "system" to keep glibc's defaults
_MALLOC_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def accelerator_plugins_installed() -> bool:
    """Whether jax could find a TPU or GPU backend: libtpu, or a PJRT plugin (the `jax_plugins`
    namespace package or entry points), found without initialising any backend."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def planned_environment(
    environ: Mapping[str, str], *, glibc: bool, accelerators: bool
) -> dict[str, str] | None:
    """The variables to add to `environ` before re-executing, or None to run as is.

    environ: the process environment; glibc: whether the C library is glibc; accelerators:
    whether an accelerator plugin is installed (`accelerator_plugins_installed`).
    """
    if not glibc or MARKER in environ:
        return None
    platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", ""))
    cpu_only = platforms.strip().lower() == "cpu"
    if accelerators and not cpu_only:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or any(name in environ for name in _MALLOC_VARIABLES):
        return None  # the user chose their own allocator settings
    return {
        "GLIBC_TUNABLES": f"{tunables}:{TUNABLES}" if tunables else TUNABLES,
        MARKER: "retained",
    }


def retain_freed_memory() -> None:
    """Re-executes this program with the allocator settings above when they apply (see the
    module docstring); returns without doing anything otherwise. Call it before any work."""
    glibc = _libc_is_glibc()
    added = planned_environment(
        os.environ, glibc=glibc, accelerators=glibc and accelerator_plugins_installed()
    )
    if added is None:
        return
    os.environ.update(added)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def describe() -> str:
    """This process's host allocator, for a benchmark's header: 'freed memory retained' (the
    settings above), 'glibc defaults', or the user's own malloc settings."""
    if os.environ.get(MARKER) == "retained":
        return "freed memory retained"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = [f"{n}={os.environ[n]}" for n in _MALLOC_VARIABLES if n in os.environ]
    if "glibc.malloc." in tunables:
        chosen.append(f"GLIBC_TUNABLES={tunables}")
    if chosen:
        return " ".join(chosen)
    return "glibc defaults" if _libc_is_glibc() else "the C library's defaults"


def _libc_is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or a C library without the name
        return False
