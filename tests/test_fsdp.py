"""FSDP on 8 fake CPU devices: what is split, how memory falls, and restoring into another mesh."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import quickstart
from diffussm_jax import parallel, training
from diffussm_jax.training import checkpoint, train_state

MIN_SIZE = 2**10  # small enough that most kernels of the test model are split


def small_config(data: int, fsdp: int):
    """The quickstart model at depth 2 (width 64, 0.2M parameters) on a data x fsdp mesh."""
    config = quickstart.get_config()
    with config.unlocked():
        config.data.data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
        config.model.depth = 2
        config.model.scan_layers = True  # stacked layers, as pods run them
        config.mesh.data, config.mesh.fsdp = data, fsdp
        config.mesh.fsdp_min_size = MIN_SIZE
    return config


def create(config, devices=None):
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.fsdp, devices)
    model = train_state.build_model(config)
    tx = train_state.create_optimizer(config)
    state, _ = train_state.create_train_state(config, model, tx, mesh)
    return state, (model, tx, mesh)


def device_bytes(tree, device) -> int:
    """Bytes that `device` actually holds for the arrays of `tree`."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def adam_moments(state):
    """(mu, nu) of the AdamW group: trees shaped like params (MaskedNode for SSM dynamics)."""
    adam = state.opt_state[1].inner_states["default"].inner_state[0]
    return adam.mu, adam.nu


@pytest.fixture(scope="module")
def states():
    return {fsdp: create(small_config(8 // fsdp, fsdp))[0] for fsdp in (1, 2, 4, 8)}


def test_large_params_ema_and_adam_moments_are_split_along_fsdp(states):
    state = states[8]
    mu, nu = adam_moments(state)
    split = 0
    for path, param in jax.tree_util.tree_leaves_with_path(state.params):
        name = jax.tree_util.keystr(path)
        spec = param.sharding.spec
        if param.size < MIN_SIZE:
            assert spec == PartitionSpec(), f"{name} {param.shape} is below the threshold"
            continue
        if "fsdp" not in spec:
            # Only per-channel SSM parameters (logical axes 'ssm', 'state') are never split.
            assert "['ssm']" in name, f"{name} {param.shape} should be split: {spec}"
            continue
        split += 1
        dim = list(spec).index("fsdp")
        shard = param.addressable_shards[0].data
        assert shard.shape[dim] * 8 == param.shape[dim], name
        # EMA and both Adam moments live exactly where the parameter lives.
        for twin in (state.ema_params, mu, nu):
            leaf = twin
            for entry in path:
                leaf = leaf[entry.key]
            assert leaf.sharding == param.sharding, name
    assert split >= 10, split  # every kernel of the test model


def test_state_bytes_per_device_fall_as_fsdp_grows(states):
    per_device = {fsdp: device_bytes(state, jax.devices()[0]) for fsdp, state in states.items()}
    # Bytes the library reports (from shardings alone) are what the device really holds.
    for fsdp, state in states.items():
        assert parallel.bytes_per_device(state) == per_device[fsdp]
    assert per_device[1] > per_device[2] > per_device[4] > per_device[8], per_device
    # Everything is held once per device at fsdp=1; split tensors shrink by 1/fsdp, so at
    # fsdp=8 the state is well under a quarter of the replicated size.
    total = sum(x.nbytes for x in jax.tree.leaves(states[1]))
    assert per_device[1] == total
    assert per_device[8] < total / 4, (per_device[8], total)


def test_mesh_axis_moves_to_a_dimension_it_divides():
    mesh = parallel.create_mesh(1, 8)
    names = ("vocab", "embed")
    assert parallel.logical_to_mesh_spec(names, (1001, 1152), mesh) == PartitionSpec(None, "fsdp")
    # "embed" comes first in the rules; when it does not divide, "vocab" takes the axis.
    assert parallel.logical_to_mesh_spec(names, (1000, 1151), mesh) == PartitionSpec("fsdp", None)
    assert parallel.logical_to_mesh_spec(names, (1001, 1151), mesh) == PartitionSpec(None, None)
    small = parallel.logical_to_mesh_spec(names, (8, 8), mesh, min_size=65)
    assert small == PartitionSpec()
    square = parallel.logical_to_mesh_spec(("hidden", "hidden_out"), (64, 64), mesh, min_size=0)
    assert square == PartitionSpec("fsdp", None)  # one mesh axis per tensor


@pytest.mark.parametrize("target", [(2, 4, 8), (1, 4, 4)], ids=["2x4", "1x4_on_4_devices"])
def test_checkpoint_restores_into_a_different_mesh(tmp_path, target):
    """Saved on (data=8, fsdp=1); restored on (data=2, fsdp=4), or on only 4 devices."""
    config = small_config(8, 1)
    state, _ = create(config)
    # Random values everywhere (Adam moments start at zero, EMA equals params), so a restore that
    # mixed up leaves or shards could not pass.
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(
        treedef,
        [
            x + jax.random.normal(k, x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    saver = checkpoint.Checkpointer(str(tmp_path), async_save=False, owner=True)
    saver.save(7, state, None, config)
    saver.wait()
    saver.close()

    data, fsdp, count = target
    new_config = small_config(data, fsdp)
    mesh = parallel.create_mesh(data, fsdp, jax.devices()[:count])
    model, tx = train_state.build_model(new_config), train_state.create_optimizer(new_config)
    abstract, shardings = train_state.abstract_train_state(new_config, model, tx, mesh)
    loader = checkpoint.Checkpointer(str(tmp_path))
    restored, step = loader.restore(abstract)
    loader.close()

    assert step == 7
    for (path, old), new, want in zip(
        jax.tree_util.tree_leaves_with_path(state),
        jax.tree.leaves(restored),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        assert new.sharding.is_equivalent_to(want, new.ndim), name
        assert {d.id for d in new.sharding.device_set} == {d.id for d in mesh.devices.flat}
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=name)
    kernel = restored.params["blocks"]["W2"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // fsdp


def _train_step_flops_per_device(config, global_batch: int) -> float:
    """XLA's FLOP count of one device's share of the compiled train step (nothing runs)."""
    from diffussm_jax.training import train_step

    with config.unlocked():
        config.global_batch_size = global_batch
    devices = jax.devices()[: config.mesh.data * config.mesh.fsdp]
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.fsdp, devices)
    model = train_state.build_model(config)
    tx = train_state.create_optimizer(config)
    abstract, shardings = train_state.abstract_train_state(config, model, tx, mesh)
    batch = train_step.abstract_batch(config, mesh, global_batch)
    diffusion = training.create_diffusion(config)
    step = train_step.make_train_step(config, model, diffusion, mesh, shardings)
    cost = step.lower(abstract, batch).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize(
    "model,data,fsdp",
    [("DiffuSSM", 8, 1), ("DiffuSSM", 2, 4), ("DiffuSSM", 1, 8), ("DiT-S/2", 1, 8)],
)
def test_each_device_computes_only_its_share_of_the_batch(model, data, fsdp):
    """On 8 devices a device's share of the train step costs about 1/8 of the whole step on
    one device. Two ways this broke: XLA's partitioner gathers the whole batch for an FFT
    (every device transformed every example), and under FSDP it gathered the activations of
    the batch instead of the weights; `ssm.batched_fft` and the block's batch constraints
    (`layers.constrain_batch`) keep each device on its own examples."""
    configs = [small_config(1, 1), small_config(data, fsdp)]
    if model != "DiffuSSM":
        for config in configs:
            with config.unlocked():
                config.model_name, config.model.num_heads = model, 4
                config.model.pos_embed = config.model.ssm.state_size = None
    one = _train_step_flops_per_device(configs[0], global_batch=8)
    eight = _train_step_flops_per_device(configs[1], global_batch=8)
    print(f"per-device FLOPs on 8 devices / one device: {eight / one:.3f}")
    assert eight < 0.25 * one, (eight, one)
