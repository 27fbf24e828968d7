"""The CPU launchers' allocator settings: when they apply, the single re-execution, and that
glibc takes them (freed large buffers are reused instead of being faulted in again)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from diffussm_jax.parallel import host_allocator

TUNABLES = host_allocator.TUNABLES


@pytest.mark.parametrize(
    "environ, glibc, accelerators, expected",
    [
        ({}, True, False, {"GLIBC_TUNABLES": TUNABLES, "DIFFUSSM_HOST_MALLOC": "retained"}),
        ({}, False, False, None),  # musl, macOS: other allocators, other tunables
        ({}, True, True, None),  # the host only stages data for an accelerator
        (
            {"JAX_PLATFORMS": "cpu"},
            True,
            True,
            {"GLIBC_TUNABLES": TUNABLES, "DIFFUSSM_HOST_MALLOC": "retained"},
        ),
        ({"JAX_PLATFORMS": "cuda,cpu"}, True, True, None),
        ({"DIFFUSSM_HOST_MALLOC": "retained"}, True, False, None),  # already re-executed
        ({"DIFFUSSM_HOST_MALLOC": "system"}, True, False, None),  # the user's opt-out
        ({"MALLOC_ARENA_MAX": "4"}, True, False, None),  # the user's own settings win
        ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, True, False, None),
        (
            {"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"},
            True,
            False,
            {
                "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512:" + TUNABLES,
                "DIFFUSSM_HOST_MALLOC": "retained",
            },
        ),
    ],
)
def test_planned_environment(environ, glibc, accelerators, expected):
    planned = host_allocator.planned_environment(environ, glibc=glibc, accelerators=accelerators)
    assert planned == expected


# Runs retain_freed_memory, then reports its arguments, how many times it started, and the page
# faults of touching a freshly malloc'd 64 MiB buffer 8 times (freed in between).
CHILD = textwrap.dedent(
    """
    import ctypes, json, os, resource, sys
    from diffussm_jax.parallel import host_allocator
    with open(sys.argv[1], "a") as f:
        f.write("start\\n")
    host_allocator.retain_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        libc.free(buffer)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"argv": sys.argv[2:], "starts": open(sys.argv[1]).read().count("start"),
                      "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults,
                      "described": host_allocator.describe()}))
    """
)


def run_child(tmp_path, **environ):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    starts = tmp_path / f"starts_{len(list(tmp_path.iterdir()))}"
    ours = ("GLIBC_TUNABLES", "DIFFUSSM_HOST_MALLOC", *host_allocator._MALLOC_VARIABLES)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd(), **environ)
    result = subprocess.run(
        [sys.executable, "-X", "utf8", str(script), str(starts), "--flag=a b", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not host_allocator._libc_is_glibc(), reason="glibc's tunables")
def test_reexecutes_once_and_freed_memory_is_reused(tmp_path):
    default = run_child(tmp_path, DIFFUSSM_HOST_MALLOC="system")
    assert default["starts"] == 1 and default["tunables"] is None
    retained = run_child(tmp_path)
    assert retained["starts"] == 2, "re-executed exactly once"
    assert retained["argv"] == ["--flag=a b", "x"], "arguments survive the re-execution"
    assert retained["tunables"] == TUNABLES
    assert retained["described"] == "freed memory retained"
    assert default["described"] == "glibc defaults"
    pages = 8 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # glibc's defaults map each 64 MiB buffer afresh: a fault per page, every time.
    assert default["faults"] > pages // 2, default
    # Retained: only the first buffer faults its pages in.
    assert retained["faults"] < pages // 4, retained
