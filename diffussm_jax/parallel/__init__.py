"""Parallelism: the device mesh, and the runtime that joins the processes of a multi-host job.

mesh.py            one `Mesh` with axes ('data', 'fsdp'), batch and replicated shardings, and
                   the logical-axis rules that place parameters, EMA and optimizer state
runtime.py         whether and how to call `jax.distributed.initialize`, barriers, the
                   topology, and agreement of a flag across processes
host_allocator.py  CPU-only runs: re-execute once with glibc's malloc keeping freed memory
                   (large buffers otherwise cost a page fault per 4 KiB page on every step)

from diffussm_jax import parallel
mesh = parallel.create_mesh(data=-1, fsdp=8)
"""

from diffussm_jax.parallel.mesh import (
    ACTIVATION_RULES,
    BATCH_AXES,
    LOGICAL_AXIS_RULES,
    batch_sharding,
    bytes_per_device,
    check_global_batch,
    create_mesh,
    logical_to_mesh_spec,
    replicated,
    state_shardings,
)
from diffussm_jax.parallel.runtime import agree_with_first, any_process, barrier

__all__ = [
    "ACTIVATION_RULES",
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "agree_with_first",
    "any_process",
    "barrier",
    "batch_sharding",
    "bytes_per_device",
    "check_global_batch",
    "create_mesh",
    "logical_to_mesh_spec",
    "replicated",
    "state_shardings",
]
