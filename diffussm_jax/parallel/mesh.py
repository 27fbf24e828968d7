"""Mesh construction and the mapping of logical parameter axes to mesh axes.

One `Mesh` with axes ('data', 'fsdp'). The batch is split over both axes. Parameters (and, with
them, EMA and optimizer state) are split over 'fsdp' by the logical-axis rules below; a tensor
below `fsdp_min_size` elements stays replicated, and a dimension that the mesh axis does not
divide leaves the axis to another dimension of the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the global batch is split over every device

# Activations: the batch axis of a block's input and output stays split over every device. Without
# this, under FSDP the partitioner may gather the activations of the whole batch instead of the
# weights (each device then computes every example of its FSDP group).
ACTIVATION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (("batch", BATCH_AXES),)

# Logical axis -> mesh axis, tried in order (see `logical_to_mesh_spec`): a mesh axis already used
# by another dimension of the same tensor, or one that does not divide the dimension, is skipped,
# so a ("hidden", "hidden_out") kernel is split on its first dimension only.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("hidden", "fsdp"),
    ("hidden_out", "fsdp"),
    ("vocab", "fsdp"),
    ("patch", None),
    ("freq", None),
    ("ssm", None),
    ("state", None),
    ("layers", None),
)


def create_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all (or the given) devices; -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1.")
    if data == -1:
        data = count // max(fsdp, 1)
    if fsdp == -1:
        fsdp = count // max(data, 1)
    if data * fsdp != count:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {count} are present; "
            "set --config.mesh.data/--config.mesh.fsdp so their product is the device count "
            "(-1 takes the rest)."
        )
    device_grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(device_grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the {devices} devices of "
            f"the mesh; use a multiple of {devices} (e.g. --config.global_batch_size="
            f"{max(devices, global_batch_size // devices * devices)})."
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the "
            f"{jax.process_count()} processes."
        )


def logical_to_mesh_spec(
    names: Sequence[str | None],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    min_size: int = 2**16,
) -> PartitionSpec:
    """The PartitionSpec of one parameter from its logical axis names.

    Rules are applied in order; a rule maps a dimension with its logical name to its mesh axis
    when that axis is still unused in this tensor and divides the dimension. A dimension that
    does not divide is left for a later dimension whose rule names the same mesh axis, so e.g. the
    (1001, 1152) label table ("vocab", "embed") is split along "embed" instead of staying whole.
    Tensors with fewer than `min_size` elements stay replicated: their all-gathers would cost
    more than the memory they save.

    Args:
      names: logical axis name (or None) per dimension.
      shape: the tensor's shape, len(shape) == len(names).
      mesh: the mesh whose axis sizes decide divisibility.
      rules: logical axis -> mesh axis (None: never split).
      min_size: element count below which the tensor is replicated.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {shape}.")
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    assigned: list[str | None] = [None] * len(shape)
    settled = [False] * len(shape)
    used: set[str] = set()
    for logical, mesh_axis in rules:
        for dim, name in enumerate(names):
            if settled[dim] or name != logical:
                continue
            if mesh_axis is None:
                settled[dim] = True
            elif mesh_axis not in used and shape[dim] % mesh.shape[mesh_axis] == 0:
                assigned[dim], settled[dim] = mesh_axis, True
                used.add(mesh_axis)
    return PartitionSpec(*assigned)


def state_shardings(
    boxed_abstract_state: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
    min_size: int = 2**16,
) -> Any:
    """NamedShardings for the unboxed version of a tree whose parameters carry logical axes.

    Args:
      boxed_abstract_state: `jax.eval_shape` of a function returning the state with
        `nn.LogicallyPartitioned` leaves (optax keeps the boxes in its moments, so they are
        sharded like the parameters).
      mesh: the ('data', 'fsdp') mesh.
      rules: logical axis -> mesh axis.
      min_size: tensors with fewer elements stay replicated.
    """

    def leaf_sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned) and not jax.tree.leaves(leaf.value):
            return leaf.value  # optax's MaskedNode placeholders for the other param group
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh, rules, min_size)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(
        leaf_sharding,
        boxed_abstract_state,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def bytes_per_device(tree: Any) -> int:
    """Bytes of `tree` (arrays or ShapeDtypeStructs with shardings) held by one device."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
