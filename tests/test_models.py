"""Module-level checks: registry, shapes, init, the hourglass wiring, sizes against the papers."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffussm_jax import hlo_stats, models, ssm
from diffussm_jax.models import layers
from diffussm_jax.models.diffussm import DiffuSSMBlock

TINY = {
    "DiffuSSM": dict(hidden_size=32, depth=2, ssm=ssm.SSMSettings(state_size=8)),
    "DiT": dict(hidden_size=32, depth=2, num_heads=2),
}


def tiny(name: str, input_size: int = 16, **overrides):
    family = "DiT" if name.startswith("DiT") else "DiffuSSM"
    return models.create(
        name, input_size=input_size, in_channels=4, num_classes=10, **{**TINY[family], **overrides}
    )


def randomize(params, key, scale=0.1):
    """Replace every parameter by noise, so zero-initialised paths carry signal."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten(
        [
            leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)
        ]
    )


def inputs(batch=2, size=16, channels=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = jnp.asarray(rng.integers(0, 11, batch), jnp.int32)
    return x, t, y


@pytest.fixture(scope="module")
def diffussm():
    model = tiny("DiffuSSM-S")
    x, t, y = inputs()
    params = nn.meta.unbox(model.init(jax.random.key(0), x, t, y))["params"]
    return model, params, jax.jit(model.apply)


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_builds_with_the_right_output(name):
    patch = int(name.split("/")[1]) if "/" in name else 1
    size = max(8, 2 * patch)
    model = tiny(name, input_size=size, depth=1)
    x, t, y = inputs(size=size)
    variables = model.init(jax.random.key(0), x, t, y)
    out = model.apply(variables, x, t, y)
    chex.assert_shape(out, (2, size, size, 8))
    assert out.dtype == jnp.float32
    # adaLN-Zero and the zero final layer: exactly zero at init.
    assert float(jnp.abs(out).max()) == 0.0


def test_names_and_errors():
    assert models.names()[:4] == ["DiffuSSM-S", "DiffuSSM-B", "DiffuSSM-L", "DiffuSSM-XL"]
    assert {"DiT-S/2", "DiT-XL/2", "DiT-XL/8", "DiT-B/4"} <= set(models.names())
    assert len(models.names()) == 4 + 12
    with pytest.raises(ValueError, match="valid names: DiffuSSM-S"):
        models.create("DiffuSSM-XXL", input_size=32, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match=r"no field\(s\) \['hidden'\]"):
        models.create("DiffuSSM-S", input_size=32, in_channels=4, num_classes=10, hidden=8)


def test_parameter_table_counts_every_parameter_once():
    params = models.abstract_params(tiny("DiffuSSM-S", scan_layers=False))
    table = models.parameter_table(params).splitlines()
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in table[1:]}
    assert {"blocks_0", "blocks_1", "conditioning", "x_embedder", "final_layer"} <= set(rows)
    assert rows.pop("total") == sum(rows.values()) == models.count_params(params)
    assert rows["blocks_0"] == models.count_params(params["blocks_0"])
    # One level further down: the block's modules, the SSM's two halves with their shapes.
    inner = models.parameter_table(params["blocks_0"], depth=2)
    (forward,) = [line for line in inner.splitlines() if line.startswith("ssm/forward ")]
    assert "log_dt 32" in forward and "c 32x4x2" in forward
    with pytest.raises(ValueError, match="no parameters"):
        models.parameter_table({})


def test_hourglass_and_input_errors_name_the_fix():
    model = tiny("DiffuSSM-S", input_size=15)
    with pytest.raises(ValueError, match="not divisible by hourglass_ratio 2"):
        model.init(jax.random.key(0), *inputs(size=15))
    with pytest.raises(ValueError, match="NHWC"):
        tiny("DiffuSSM-S").init(jax.random.key(0), *inputs(size=8))


def test_init_values(diffussm):
    _, params, _ = diffussm
    blocks = params["blocks"]
    assert blocks["W0"]["kernel"].shape == (2, 32, 32)  # stacked over depth by nn.scan
    for zero in (
        blocks["adaLN_modulation"]["linear"]["kernel"],
        params["final_layer"]["linear"]["kernel"],
        params["final_layer"]["adaLN_modulation"]["linear"]["kernel"],
    ):
        assert float(jnp.abs(zero).max()) == 0.0
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)) for each of the M Wdown maps (64 -> 32).
    wdown = blocks["Wdown"]["kernel"]
    assert wdown.shape == (2, 2, 64, 32)  # (depth, M, in, out)
    bound = np.sqrt(6 / (64 + 32))
    assert float(jnp.abs(wdown).max()) <= bound and float(jnp.abs(wdown).max()) > 0.9 * bound
    emb = params["conditioning"]["y_embedder"]["embedding"]
    assert emb.shape == (11, 32) and 0.01 < float(emb.std()) < 0.03  # normal(0.02), null row
    # The layers of the stack are initialised independently.
    assert not np.allclose(blocks["ssm"]["forward"]["c"][0], blocks["ssm"]["forward"]["c"][1])


@pytest.mark.parametrize("name", ["DiffuSSM-S", "DiT-S/2"])
def test_conditioning_init_scales_are_config_fields(name):
    """label_init_std / timestep_init_std set the normal inits of the label table and t-MLP."""
    x, t, y = inputs(size=8)

    def conditioning(**overrides):
        variables = tiny(name, input_size=8, hidden_size=64, **overrides).init(
            jax.random.key(0), x, t, y
        )
        return nn.meta.unbox(variables)["params"]["conditioning"]

    spec = conditioning()  # DiT's init, the spec's default
    fast = conditioning(label_init_std=1.0, timestep_init_std=0.1)
    for params, label_std, t_std in ((spec, 0.02, 0.02), (fast, 1.0, 0.1)):
        table = np.asarray(params["y_embedder"]["embedding"])  # (11, 64): 704 draws
        assert abs(table.std() / label_std - 1) < 0.1
        for layer in ("mlp_in", "mlp_out"):
            kernel = np.asarray(params["t_embedder"][layer]["kernel"])
            assert abs(kernel.std() / t_std - 1) < 0.1, layer


@pytest.mark.parametrize("family", ["DiffuSSM-S", "DiT-S/2"])
def test_timestep_scale_maps_flow_time_onto_the_step_embedding(family):
    """With timestep_scale = 1000 (flow), t = 0.25 conditions like step 250 at scale 1, on the
    same parameters; the scale adds none."""
    x, _, y = inputs(size=8)
    steps = tiny(family, input_size=8)
    times = tiny(family, input_size=8, timestep_scale=1000.0)
    params = randomize(
        nn.meta.unbox(steps.init(jax.random.key(0), x, jnp.zeros(2, jnp.int32), y))["params"],
        jax.random.key(5),
    )
    chex.assert_trees_all_equal_shapes(
        params, nn.meta.unbox(times.init(jax.random.key(0), x, jnp.zeros(2), y))["params"]
    )
    by_step = steps.apply({"params": params}, x, jnp.array([250, 900], jnp.int32), y)
    by_time = times.apply({"params": params}, x, jnp.array([0.25, 0.9], jnp.float32), y)
    np.testing.assert_allclose(by_time, by_step, rtol=1e-5, atol=1e-6)
    unscaled = steps.apply({"params": params}, x, jnp.array([0.25, 0.9], jnp.float32), y)
    assert not np.allclose(unscaled, by_step, atol=1e-3)


def test_hourglass_groups_horizontal_neighbours():
    """With no blocks, output pixel (i, j) depends exactly on input pixels (i, 2*(j//2) + {0,1})."""
    model = tiny("DiffuSSM-S", input_size=8, depth=0)
    x, t, y = inputs(size=8)
    params = randomize(
        nn.meta.unbox(model.init(jax.random.key(0), x, t, y))["params"], jax.random.key(1)
    )
    base = model.apply({"params": params}, x, t, y)
    changed = model.apply({"params": params}, x.at[:, 3, 4].add(1.0), t, y) - base
    moved = np.abs(np.asarray(changed)).max(axis=(0, 3)) > 0
    expected = np.zeros((8, 8), bool)
    expected[3, 4:6] = True
    np.testing.assert_array_equal(moved, expected)


def test_blocks_mix_the_whole_sequence(diffussm):
    """The bidirectional SSM reaches every position: a change at one pixel moves all outputs."""
    _, params, apply = diffussm
    params = randomize(params, jax.random.key(2))
    x, t, y = inputs()
    delta = apply({"params": params}, x.at[:, 8, 8].add(1.0), t, y) - apply(
        {"params": params}, x, t, y
    )
    assert np.all(np.abs(np.asarray(delta)).max(axis=(0, 3)) > 0)


def test_null_label_and_conditioning(diffussm):
    model, params, apply = diffussm
    params = randomize(params, jax.random.key(3))
    x, t, _ = inputs()
    null = apply({"params": params}, x, t, None)
    np.testing.assert_array_equal(null, apply({"params": params}, x, t, jnp.full((2,), 10)))
    assert not np.allclose(null, apply({"params": params}, x, t, jnp.zeros((2,), jnp.int32)))
    # Training drops labels to null with probability 0.1 (the train step's `drop_labels`).
    y = jnp.zeros((256,), jnp.int32)
    xs, ts = jnp.zeros((256, 16, 16, 4)), jnp.full((256,), 10)
    dropped_y = layers.drop_labels(jax.random.key(0), y, model.class_dropout_prob, 10)
    train = apply({"params": params}, xs, ts, dropped_y)
    eval_out = apply({"params": params}, xs, ts, y)
    null_out = apply({"params": params}, xs, ts, jnp.full((256,), 10))
    dropped = np.all(np.isclose(train, null_out, atol=1e-5), axis=(1, 2, 3))
    kept = np.all(np.isclose(train, eval_out, atol=1e-5), axis=(1, 2, 3))
    assert np.all(dropped ^ kept) and 10 <= dropped.sum() <= 45


def unstack_layers(params, depth):
    """nn.scan params (stacked 'blocks') -> the unrolled layout ('blocks_0', ...)."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], params["blocks"])
    return out


@pytest.mark.parametrize("family", ["DiffuSSM-S", "DiT-S/2"])
def test_scan_remat_and_unrolled_agree(family):
    x, t, y = inputs(size=8)
    scanned = tiny(family, input_size=8)
    params = randomize(
        nn.meta.unbox(scanned.init(jax.random.key(0), x, t, y))["params"], jax.random.key(4)
    )
    reference = scanned.apply({"params": params}, x, t, y)
    unrolled = tiny(family, input_size=8, scan_layers=False, remat=True)
    out = unrolled.apply({"params": unstack_layers(params, 2)}, x, t, y)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family,policy",
    [
        ("DiffuSSM-S", "full"),
        ("DiffuSSM-S", "save_matmuls"),
        ("DiffuSSM-S", "ssm_only"),
        ("DiT-S/2", "save_matmuls"),
    ],
)
def test_remat_policies_change_memory_not_values_or_gradients(family, policy):
    """Each remat policy computes the same loss and gradients as none; the jaxpr holds a
    remat (checkpoint) primitive, so the policy was applied."""
    x, t, y = inputs(size=8)
    plain = tiny(family, input_size=8)
    params = randomize(
        nn.meta.unbox(plain.init(jax.random.key(0), x, t, y))["params"], jax.random.key(6)
    )
    rematted = tiny(family, input_size=8, remat=policy)

    def loss(model, params):
        return jnp.mean(jnp.sin(model.apply({"params": params}, x, t, y)))

    value, grads = jax.value_and_grad(functools.partial(loss, plain))(params)
    value_r, grads_r = jax.value_and_grad(functools.partial(loss, rematted))(params)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, rematted)))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_unknown_remat_policy_and_ssm_only_on_dit_are_explained():
    x, t, y = inputs(size=8)
    with pytest.raises(ValueError, match=r"remat='everything'.*none.*save_matmuls"):
        tiny("DiffuSSM-S", input_size=8, remat="everything").init(jax.random.key(0), x, t, y)
    with pytest.raises(ValueError, match=r"ssm_only.*DiT takes none, full or save_matmuls"):
        tiny("DiT-S/2", input_size=8, remat="ssm_only").init(jax.random.key(0), x, t, y)


@pytest.mark.parametrize("family", ["DiffuSSM-S", "DiT-S/2"])
def test_bfloat16_compute_close_to_float32(family):
    x, t, y = inputs(size=8)
    model = tiny(family, input_size=8)
    params = randomize(
        nn.meta.unbox(model.init(jax.random.key(0), x, t, y))["params"], jax.random.key(5)
    )
    out32 = model.apply({"params": params}, x, t, y)
    out16 = tiny(family, input_size=8, dtype=jnp.bfloat16).apply({"params": params}, x, t, y)
    assert out16.dtype == jnp.float32  # outputs are returned in float32 for the loss
    # bf16 keeps 8 mantissa bits: relative error per op ~ 2^-8; through two blocks we allow 5%
    # of the output scale (measured: ~1%). A float16 overflow or wrong cast gives O(1) errors.
    err = float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max())
    assert err < 0.05, err


def diffussm_param_formula(width, depth, state_size=64, ratio=2, in_channels=4, num_classes=1000):
    """Independent count from the spec's shapes (weights + biases) for learn_sigma=True."""
    d, out = width, 2 * in_channels
    per_layer = (
        (d * d + d)  # W0
        + (ratio * d * d + ratio * d)  # Wup: M maps D -> D
        + (2 * d * 2 * d + 2 * d)  # Wdown: M maps 2D -> 2D/M
        + (d * 2 * d + 2 * d)  # W1
        + (2 * d * 2 * d + 2 * d)  # W2
        + (2 * d * d + d)  # W3
        + (d * 3 * d + 3 * d)  # adaLN
        + 2 * d * (1 + state_size // 2 * 2 + state_size + 1)  # two S4D: dt, A (re, im), C, D
    )
    embed = ratio * in_channels * d + d + 256 * d + d + d * d + d + (num_classes + 1) * d
    final = d * 2 * d + 2 * d + d * ratio * out + ratio * out
    return depth * per_layer + embed + final


@pytest.fixture(scope="module")
def xl_stats():
    return {
        (name, size): models.stats(name, input_size=size)
        for name in ("DiffuSSM-XL", "DiT-XL/2")
        for size in (32, 64)
    }


def test_dit_xl2_matches_paper(xl_stats):
    for size, paper_gmacs in ((32, 118.6), (64, 524.6)):
        stats = xl_stats[("DiT-XL/2", size)]
        assert abs(stats["params"] / 675e6 - 1) < 0.02, stats["params"]
        assert abs(stats["forward_gmacs"] / paper_gmacs - 1) < 0.02, stats["forward_gmacs"]


def test_diffussm_xl_size_and_cost(xl_stats):
    for size in (32, 64):
        stats = xl_stats[("DiffuSSM-XL", size)]
        assert stats["params"] == diffussm_param_formula(1152, 29)
        # 707.3M vs the paper's 673M (+5.1%): the README explains the gap.
        assert 0.95 < stats["params"] / 673e6 < 1.06
        breakdown = stats["gmacs_breakdown"]
        seq_len = size * size
        dense = breakdown["blocks"] - breakdown["blocks.ssm"]
        assert abs(dense / (7.5 * seq_len * 1152**2 * 29 / 1e9) - 1) < 0.03
        # The SSM (FFTs and kernel generation) is a small part of the cost.
        assert 0 < breakdown["blocks.ssm"] < 0.1 * stats["forward_gmacs"]


@pytest.mark.parametrize("name", ["gelu_tanh", "gelu", "silu"])
def test_activations_keep_values_and_exact_gradients(name):
    """The lean-gradient activations return the library's values bit for bit, and their
    float64 gradients equal autodiff of the library's function."""
    plain = {
        "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
        "gelu": lambda x: nn.gelu(x, approximate=False),
        "silu": nn.silu,
    }[name]
    lean = layers.activation_fn(name)
    x32 = jnp.linspace(-6, 6, 1001, dtype=jnp.float32)
    np.testing.assert_array_equal(lean(x32), plain(x32))
    with jax.enable_x64():
        x = jnp.linspace(-6, 6, 1001, dtype=jnp.float64)
        got = jax.vmap(jax.grad(lean))(x)
        want = jax.vmap(jax.grad(plain))(x)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_layer_norm_gradient_is_exact_in_float64():
    def reference(x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-6)

    rng = np.random.default_rng(0)
    with jax.enable_x64():
        x = jnp.asarray(3 + 2 * rng.normal(size=(4, 7, 48)))
        g = jnp.asarray(rng.normal(size=x.shape))
        y, vjp = jax.vjp(layers.layer_norm, x)
        y_ref, vjp_ref = jax.vjp(reference, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "spec,x_shape,kernel_shape",
    [
        ("...i,io->...o", (5, 48), (48, 24)),
        ("...i,io->...o", (2, 3, 7, 48), (48, 24)),
        ("...i,imo->...mo", (4, 6, 48), (48, 2, 16)),  # Wup's (in, M, out) kernel
    ],
)
def test_dense_dot_matches_einsum_in_float64(spec, x_shape, kernel_shape):
    """The 2-D folded matmul gives the einsum's values and both gradients."""
    rng = np.random.default_rng(0)
    with jax.enable_x64():
        x = jnp.asarray(rng.normal(size=x_shape))
        kernel = jnp.asarray(rng.normal(size=kernel_shape))
        y, vjp = jax.vjp(layers.dense_dot, x, kernel)
        y_ref, vjp_ref = jax.vjp(functools.partial(jnp.einsum, spec), x, kernel)
        assert y.shape == y_ref.shape == (*x_shape[:-1], *kernel_shape[1:])
        g = jnp.asarray(rng.normal(size=y.shape))
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(vjp(g), vjp_ref(g), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def per_example_residual_bytes(block, x, c):
    """Bytes per example that a block's backward pass keeps (the per-example leaves of the
    vjp closure; shapes only, nothing computed)."""
    variables = jax.eval_shape(block.init, jax.random.key(0), x, c)

    def saved(variables, x, c):
        return jax.tree.leaves(jax.vjp(lambda v, x: block.apply(v, x, c), variables, x)[1])

    batch = x.shape[0]
    return sum(
        np.prod(a.shape[1:]) * a.dtype.itemsize
        for a in jax.eval_shape(saved, variables, x, c)
        if a.shape and a.shape[0] == batch
    )


def test_diffussm_block_backward_keeps_27_activation_sized_tensors():
    """Without remat every layer's residuals are kept, so their size sets the memory per
    example. In units of one (J, D) activation in the compute dtype, a block needs 27: the
    normalised input and its modulation (2), W0's output and GELU slope (2), Wup's (2 x 2,
    at length L = 2J), the SSM's input (2) and output (4), Wdown's, W1's and W2's outputs and
    slopes (3 x 4), the gated product (2) and W3's output for the gate (1). JAX's own GELU,
    LayerNorm and FFT gradients kept 73 (docs/pod.md)."""
    batch, short_len, width = 3, 64, 32
    block = DiffuSSMBlock(hidden_size=width, ssm=ssm.SSMSettings(state_size=8), dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((batch, short_len, width), jnp.bfloat16)
    c = jax.ShapeDtypeStruct((batch, width), jnp.bfloat16)
    unit = short_len * width * 2
    # + the LayerNorm's 1/std and the (1, D) modulation rows: a few bytes per token.
    assert per_example_residual_bytes(block, x, c) <= 27 * unit + 8 * short_len + 4 * width


def test_hourglass_projections_compile_without_layout_copies():
    """Activation-sized copies (data moved to another layout) in the optimised HLO of one
    DiffuSSM block's forward and backward pass, on XLA:CPU. 13 remain: the 4 moves of the
    SSM's time-major layout in and out (forward and backward) and 1 in its recomputation;
    Wdown's output interleaved back into (B, J, 2D) and its gradient (2, half-size); and one
    per weight gradient of W0, Wup, Wdown, W1, W2 and W3 (6), which XLA:CPU makes for every
    dense layer to contract over the tokens. With Wdown contracting over a sub-position axis
    in the middle of (B, J, M, 2D) there were 21."""
    batch, short_len, width = 3, 40, 24
    block = DiffuSSMBlock(hidden_size=width, ssm=ssm.SSMSettings(state_size=8), dtype=jnp.bfloat16)
    x = jnp.ones((batch, short_len, width), jnp.bfloat16)
    c = jnp.ones((batch, width), jnp.bfloat16)
    variables = block.init(jax.random.key(0), x, c)

    def loss(variables, x):
        return block.apply(variables, x, c).astype(jnp.float32).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile()
    ops = hlo_stats.layout_ops(compiled.as_text(), min_elements=batch * short_len * width)
    copies = [op for op in ops if op.opcode == "copy"]
    assert len(copies) <= 13, [(op.shape, op.source) for op in copies]
    assert not [op for op in ops if "Wup" in op.source or "Wdown" in op.source]


def test_precision_policy_parses_names_and_pairs_and_explains_mistakes():
    assert models.Precision.parse("bfloat16") == models.Precision(compute="bfloat16")
    custom = models.Precision.parse("compute=bfloat16,residual=bfloat16")
    assert (custom.params, custom.compute, custom.residual, custom.ssm) == (
        "float32",
        "bfloat16",
        "bfloat16",
        "float32",
    )
    assert custom.name == "compute=bfloat16,residual=bfloat16"
    assert models.Precision.parse(custom.name) == custom
    assert "residual stream float32" in models.Precision.parse("float32").describe()
    with pytest.raises(models.PrecisionError, match=r"ROLE=DTYPE.*compute=bfloat16"):
        models.Precision.parse("compute:bfloat16")
    with pytest.raises(models.PrecisionError, match=r"compute='bf16'.*bfloat16"):
        models.Precision.parse("compute=bf16")
    with pytest.raises(models.PrecisionError, match=r"FFT.*float32 or float64"):
        models.Precision(ssm="bfloat16")


@pytest.mark.parametrize("family", ["DiffuSSM-S", "DiT-S/2"])
@pytest.mark.parametrize("residual", ["float32", "bfloat16"])
def test_precision_policy_sets_the_same_dtypes_in_both_models(family, residual):
    """Parameters, the residual stream between blocks and the matmuls follow one policy."""
    policy = models.Precision(params="float32", compute="bfloat16", residual=residual)
    model = tiny(family, input_size=8, scan_layers=False, precision=policy)
    x, t, y = inputs(size=8)
    variables = model.init(jax.random.key(0), x, t, y)
    params = nn.meta.unbox(variables)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    out, state = model.apply(variables, x, t, y, capture_intermediates=True)
    assert out.dtype == jnp.float32
    for i in range(2):
        (block_out,) = state["intermediates"][f"blocks_{i}"]["__call__"]
        block_out = block_out[0] if isinstance(block_out, tuple) else block_out
        assert block_out.dtype == jnp.dtype(residual)
    dense = state["intermediates"]["blocks_0"]["mlp" if family.startswith("DiT") else "W0"]
    assert dense["__call__"][0].dtype == jnp.bfloat16
