"""DiT baseline: shapes, adaLN-Zero init, a float64 numpy reference block, scan/remat equivalence,
bf16 precision, parameter counts against the paper, and input validation."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffussm_jax.models import layers
from diffussm_jax.models.dit import (
    DIT_VARIANTS,
    DiT,
    DiTBlock,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)

BATCH = 2
TINY = dict(
    input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10
)


def tiny_inputs(seed: int = 0, batch: int = BATCH):
    """x (B, 16, 16, 4), t (B,) float, y (B,) int; numpy draws, so no per-shape compiles."""
    rng = np.random.default_rng(seed)
    size, channels = TINY["input_size"], TINY["in_channels"]
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, batch), jnp.float32)
    y = jnp.asarray(rng.integers(0, TINY["num_classes"], batch), jnp.int32)
    return x, t, y


def randomize(params, seed: int = 1, scale: float = 0.2):
    """Every parameter -> scale * N(0, 1) (unboxed), so zero-initialised gates do not hide bugs.

    Works on real or `jax.eval_shape` parameters, so tests need not compile an init.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
        nn.meta.unbox(params),
    )


def boxed_by_path(params) -> dict[str, nn.Partitioned]:
    """'blocks/attn/qkv/.../kernel' -> its Partitioned box, whatever wrapper modules sit between."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def find(flat: dict, prefix: str, leaf: str):
    matches = [v for k, v in flat.items() if k.startswith(prefix) and k.endswith("/" + leaf)]
    assert len(matches) == 1, (prefix, leaf, list(flat))
    return matches[0]


def param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
    """The tiny scanned DiT, its init params (boxed), randomised params (unboxed), jitted apply."""
    model = DiT(**TINY)
    x, t, y = tiny_inputs()
    params = jax.jit(model.init)(jax.random.key(0), x, t, y)
    return model, params, randomize(params), jax.jit(model.apply)


# ----------------------------------------------------------------------------------------------
# Op level.


def test_patchify_is_raster_order_of_patches_and_unpatchify_inverts_it():
    p, grid = 4, 3
    x = np.arange(1 * grid * p * grid * p * 2, dtype=np.float32).reshape(1, grid * p, grid * p, 2)
    tokens = np.asarray(patchify(jnp.asarray(x), p))
    assert tokens.shape == (1, grid * grid, p * p * 2)
    for row in range(grid):
        for col in range(grid):
            patch = x[0, row * p : (row + 1) * p, col * p : (col + 1) * p, :]
            np.testing.assert_array_equal(tokens[0, row * grid + col], patch.reshape(-1))
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(tokens), p, grid)), x)


def test_pos_embed_is_dit_2d_sincos():
    dim, grid = 16, 5
    table = sincos_pos_embed_2d(dim, grid)
    assert table.shape == (grid * grid, dim) and table.dtype == np.float32
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            for i in range(quarter):
                w = 10_000.0 ** (-i / quarter)
                expected = [
                    math.sin(col * w),
                    math.cos(col * w),
                    math.sin(row * w),
                    math.cos(row * w),
                ]
                got = table[row * grid + col, [i, quarter + i, 2 * quarter + i, 3 * quarter + i]]
                np.testing.assert_allclose(got, expected, atol=1e-6)


def _walk_eqns(jaxpr):
    """All equations of a jaxpr, including those inside scan / remat / pjit sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns"):
                    yield from _walk_eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _walk_eqns(sub.jaxpr)


def test_attention_softmax_runs_in_float32_inside_a_bf16_model(tiny):
    _, params, _, _ = tiny
    model = DiT(**TINY, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(model.apply)(params, *tiny_inputs()).jaxpr
    eqns = list(_walk_eqns(jaxpr))
    exps = [e for e in eqns if e.primitive.name == "exp"]
    # One exp is the timestep frequencies; the softmax inside the scanned block is the other.
    assert len(exps) >= 2
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
    # And the model does compute its matmuls in bf16 (otherwise the check above proves nothing).
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert any(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)


# ----------------------------------------------------------------------------------------------
# Module level.


@pytest.mark.parametrize(
    "patch_size,learn_sigma,num_classes", [(2, True, 10), (4, False, 10), (8, True, 0)]
)
def test_output_shape(patch_size, learn_sigma, num_classes):
    model = DiT(
        **{**TINY, "patch_size": patch_size, "num_classes": num_classes}, learn_sigma=learn_sigma
    )
    x, t, y = tiny_inputs()
    y = y if num_classes else None
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    out = jax.eval_shape(model.apply, params, x, t, y)
    channels = TINY["in_channels"] * (2 if learn_sigma else 1)
    assert out.shape == (BATCH, TINY["input_size"], TINY["input_size"], channels)
    assert out.dtype == jnp.float32
    x_embed = find(boxed_by_path(params), "params/x_embedder", "kernel")
    assert x_embed.value.shape == (patch_size**2 * TINY["in_channels"], TINY["hidden_size"])


def test_output_is_exactly_zero_at_init(tiny):
    _, params, _, apply = tiny
    out = apply(params, *tiny_inputs(seed=3))
    assert out.shape == (BATCH, 16, 16, 8)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_blocks_are_identity_at_init(tiny):
    """adaLN-Zero: with zero gates each block passes its input through, whatever the weights."""
    _, params, _, _ = tiny
    block = DiTBlock(hidden_size=TINY["hidden_size"], num_heads=TINY["num_heads"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, 8, TINY["hidden_size"])), jnp.float32)
    c = jnp.asarray(rng.standard_normal((BATCH, TINY["hidden_size"])), jnp.float32)
    layers = nn.meta.unbox(params)["params"]["blocks"]
    for i in range(TINY["depth"]):
        layer = jax.tree.map(lambda w, i=i: w[i], layers)
        out, _ = jax.jit(block.apply)({"params": layer}, x, c)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_blocks_are_permutation_equivariant_and_positions_break_it(tiny):
    """Attention and MLP treat tokens as a set, so only the positional embedding tells the model
    where a patch is: shuffling patches must shuffle a block's output, but not the model's."""
    _, _, params, apply = tiny
    rng = np.random.default_rng(0)
    block = DiTBlock(hidden_size=TINY["hidden_size"], num_heads=TINY["num_heads"])
    layer = jax.tree.map(lambda w: w[0], params["params"]["blocks"])
    tokens = jnp.asarray(rng.standard_normal((BATCH, 8, TINY["hidden_size"])), jnp.float32)
    c = jnp.asarray(rng.standard_normal((BATCH, TINY["hidden_size"])), jnp.float32)
    perm = rng.permutation(8)
    block_apply = jax.jit(block.apply)
    out, _ = block_apply({"params": layer}, tokens, c)
    out_of_shuffled, _ = block_apply({"params": layer}, tokens[:, perm], c)
    assert np.abs(np.asarray(out - tokens)).max() > 0.1
    np.testing.assert_allclose(out_of_shuffled, out[:, perm], rtol=1e-5, atol=1e-5)

    patch_size, grid = TINY["patch_size"], TINY["input_size"] // TINY["patch_size"]
    perm = rng.permutation(grid * grid)

    def shuffle_patches(image):
        return unpatchify(patchify(image, patch_size)[:, perm], patch_size, grid)

    x, t, y = tiny_inputs()
    out = apply(params, x, t, y)
    out_of_shuffled = apply(params, shuffle_patches(x), t, y)
    assert np.abs(np.asarray(out_of_shuffled - shuffle_patches(out))).max() > 0.1


def test_init_distributions(tiny):
    _, params, _, _ = tiny
    flat = boxed_by_path(params)
    width = TINY["hidden_size"]

    def check_xavier(kernel, fan_in, fan_out):
        bound = math.sqrt(6 / (fan_in + fan_out))
        kernel = np.asarray(kernel)
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound  # uniform, not a narrower distribution

    qkv = np.asarray(find(flat, "params/blocks/attn/qkv", "kernel").value)
    assert qkv.shape == (TINY["depth"], width, 3 * width)
    for layer in qkv:  # each scanned layer is its own xavier draw of the whole D x 3D matrix
        check_xavier(layer, width, 3 * width)
    assert not np.array_equal(qkv[0], qkv[1])  # split_rngs gives every layer its own init
    patch_in = TINY["patch_size"] ** 2 * TINY["in_channels"]
    check_xavier(find(flat, "params/x_embedder", "kernel").value, patch_in, width)
    for path, box in flat.items():
        if path.endswith("/bias") or "adaLN_modulation" in path or "final_layer/linear" in path:
            np.testing.assert_array_equal(np.asarray(box.value), 0.0, err_msg=path)
    table = np.asarray(find(flat, "params/conditioning/y_embedder", "embedding").value)
    assert table.shape == (TINY["num_classes"] + 1, width)  # the extra row is the null label
    assert abs(table.std() - 0.02) < 0.004


def test_logical_axis_names(tiny):
    _, params, _, _ = tiny
    flat = boxed_by_path(params)
    expected = {
        "params/blocks/attn/qkv": ("layers", "embed", "hidden"),
        "params/blocks/attn/proj": ("layers", "hidden", "embed"),
        "params/blocks/mlp/fc1": ("layers", "embed", "hidden"),
        "params/blocks/mlp/fc2": ("layers", "hidden", "embed"),
        "params/x_embedder": ("patch", "embed"),
    }
    for prefix, names in expected.items():
        assert find(flat, prefix, "kernel").names == names, prefix
    assert all(isinstance(leaf, nn.Partitioned) for leaf in flat.values())


def _numpy_block(params, x, c, num_heads):
    """DiT's DiTBlock in float64 numpy, written from the reference PyTorch code."""
    get = lambda prefix, leaf: np.asarray(find(params, prefix, leaf), np.float64)

    def linear(prefix, h):
        return h @ get(prefix, "kernel") + get(prefix, "bias")

    def norm(h):
        return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)

    def gelu_tanh(h):
        return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    batch, length, width = x.shape
    head_dim = width // num_heads
    silu_c = c / (1 + np.exp(-c))
    chunks = np.split(linear("adaLN_modulation", silu_c)[:, None, :], 6, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks

    h = norm(x) * (1 + scale_msa) + shift_msa
    qkv = linear("attn/qkv", h).reshape(batch, length, 3, num_heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, heads, L, head_dim)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
    x = x + gate_msa * linear("attn/proj", attn)

    h = norm(x) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * linear("mlp/fc2", gelu_tanh(linear("mlp/fc1", h)))


def test_block_matches_float64_numpy_reference():
    block = DiTBlock(hidden_size=32, num_heads=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, 12, 32)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((BATCH, 32)), jnp.float32)
    params = randomize(jax.eval_shape(block.init, jax.random.key(0), x, c), scale=0.3)
    out, _ = jax.jit(block.apply)(params, x, c)
    flat = {
        "/".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"])[0]
    }
    expected = _numpy_block(flat, np.asarray(x, np.float64), np.asarray(c, np.float64), 4)
    assert np.abs(expected - np.asarray(x)).max() > 0.1  # the block does something to compare
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def _unstack_blocks(scanned: dict, depth: int) -> dict:
    """{'blocks': stacked} (scan layout) -> {'blocks_0': layer 0, ...} (plain-loop layout)."""
    params = {k: v for k, v in scanned.items() if k != "blocks"}
    for i in range(depth):
        params[f"blocks_{i}"] = jax.tree.map(lambda w, i=i: w[i], scanned["blocks"])
    return params


def test_scan_and_remat_match_the_plain_loop(tiny):
    """The training configuration (scan + remat) against a plain Python loop over the blocks,
    outputs and gradients; plain scan (the fixture's apply) against the loop's outputs."""
    _, _, scan_params, scan_apply = tiny
    x, t, y = tiny_inputs()
    loop_model = DiT(**TINY, scan_layers=False)
    loop_params = {"params": _unstack_blocks(scan_params["params"], TINY["depth"])}
    loop_shapes = jax.eval_shape(loop_model.init, jax.random.key(0), x, t, y)
    assert jax.tree.map(jnp.shape, loop_params) == jax.tree.map(
        jnp.shape, nn.meta.unbox(loop_shapes)
    )

    def loss_and_output(model, params):
        out = model.apply(params, x, t, y)
        return jnp.mean(out**2), out

    def grads_and_output(model, params):
        fn = jax.jit(jax.grad(lambda p: loss_and_output(model, p), has_aux=True))
        return fn(params)

    loop_grads, expected = grads_and_output(loop_model, loop_params)
    assert np.abs(np.asarray(expected)).max() > 0.1
    train_model = DiT(**TINY, scan_layers=True, remat=True)
    jaxpr = jax.make_jaxpr(train_model.apply)(scan_params, x, t, y).jaxpr
    remat_names = {"checkpoint", "remat2"}  # the primitive was renamed across jax versions
    assert any(e.primitive.name in remat_names for e in _walk_eqns(jaxpr))
    grads, out = grads_and_output(train_model, scan_params)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scan_apply(scan_params, x, t, y), expected, rtol=1e-5, atol=1e-5)
    grads = {"params": _unstack_blocks(grads["params"], TINY["depth"])}
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, loop_grads
    )


def test_bf16_compute_is_close_to_fp32(tiny):
    """bf16 matmuls with float32 params, residual stream and softmax stay within 3e-2 relative L2
    of float32. On these random params (scale 0.2, so gates are large) rounding the params alone
    to bf16 already costs 6e-3; the full bf16 forward measures 1.2e-2."""
    _, _, params, apply = tiny
    x, t, y = tiny_inputs()
    reference = np.asarray(apply(params, x, t, y))
    out = jax.jit(DiT(**TINY, dtype=jnp.bfloat16).apply)(params, x, t, y)
    assert out.dtype == jnp.float32
    rel_err = np.linalg.norm(np.asarray(out) - reference) / np.linalg.norm(reference)
    assert 0 < rel_err < 3e-2, rel_err


def test_label_dropout_uses_the_null_label_in_training(tiny):
    _, _, params, apply = tiny
    x, t, y = tiny_inputs()
    null = np.asarray(apply(params, x, t, None))
    labelled = np.asarray(apply(params, x, t, y))
    assert np.abs(labelled - null).max() > 1e-3
    always_drop = DiT(**TINY, class_dropout_prob=1.0)
    dropped_y = layers.drop_labels(
        jax.random.key(5), y, always_drop.class_dropout_prob, always_drop.num_classes
    )
    dropped = jax.jit(always_drop.apply)(params, x, t, dropped_y)
    np.testing.assert_allclose(dropped, null, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Paper sizes (shapes only: XL weights are never materialised).


def _formula_count(hidden_size, depth, patch_size, in_channels=4, num_classes=1000, **_):
    """Independent count of DiT's parameters (learned sigma), excluding the frozen positions."""
    d, patch_in = hidden_size, patch_size**2 * in_channels
    block = 18 * d * d + 15 * d  # qkv 3D^2, proj D^2, MLP 8D^2, adaLN 6D^2 (+ biases)
    embedders = (patch_in * d + d) + (256 * d + d + d * d + d) + (num_classes + 1) * d
    final = (2 * d * d + 2 * d) + (d * 2 * patch_in + 2 * patch_in)
    return depth * block + embedders + final


@pytest.mark.parametrize(
    "name,paper_millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)]
)
def test_param_count_matches_paper(name, paper_millions):
    kwargs = DIT_VARIANTS[name]
    model = DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **kwargs)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    count = param_count(jax.eval_shape(model.init, jax.random.key(0), x, t, y))
    assert count == _formula_count(**kwargs)
    # The reference also counts its frozen pos_embed buffer (T x D), which we keep as a constant.
    tokens = (32 // kwargs["patch_size"]) ** 2
    reference_count = count + tokens * kwargs["hidden_size"]
    assert abs(reference_count / (paper_millions * 1e6) - 1) < 0.01, reference_count
    if name == "DiT-XL/2":
        assert reference_count == 675_129_632  # the count the reference training script prints


def test_variants_registry():
    assert len(DIT_VARIANTS) == 12
    assert DIT_VARIANTS["DiT-XL/8"] == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=8)
    assert DIT_VARIANTS["DiT-L/4"] == dict(hidden_size=1024, depth=24, num_heads=16, patch_size=4)


# ----------------------------------------------------------------------------------------------
# Input validation.


def test_bad_patch_size_names_both_numbers_and_the_fix():
    with pytest.raises(ValueError, match=r"input_size=30 .*patch_size=4.*divides 30"):
        DiT(**{**TINY, "input_size": 30, "patch_size": 4})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"hidden_size=36 .*num_heads=5"):
        DiT(**{**TINY, "hidden_size": 36, "num_heads": 5})


def test_input_shape_errors(tiny):
    model, params, _, _ = tiny
    x, t, y = tiny_inputs()
    with pytest.raises(ValueError, match=r"expected \(B, 16, 16, 4\)"):
        model.apply(params, x[:, :8], t, y)
    with pytest.raises(ValueError, match=r"expected \(B, 16, 16, 4\)"):
        model.apply(params, x[..., :3], t, y)
    with pytest.raises(ValueError, match=r"t has shape \(3,\)"):
        model.apply(params, x, jnp.zeros(3), y)
