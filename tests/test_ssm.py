"""Op- and layer-level checks of the S4D math: FFT conv == direct conv == recurrence (float64)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from diffussm_jax import ssm


def random_ssm(rng: np.random.Generator, channels: int, state_size: int, init: str = "lin"):
    """Random S4D parameters in float64/complex128: log_dt (H,), a, c (H, N/2), d (H,)."""
    half = state_size // 2
    eig = ssm.s4d_eigenvalues(state_size, init)
    # Perturb the real parts so that channels decay at different rates.
    a = -rng.uniform(0.1, 1.0, (channels, half)) + 1j * np.broadcast_to(eig.imag, (channels, half))
    c = rng.normal(size=(channels, half)) + 1j * rng.normal(size=(channels, half))
    log_dt = np.log(rng.uniform(0.001, 0.1, channels))
    d = rng.normal(size=channels)
    return log_dt, a, c, d


def numpy_kernel(log_dt, a, c, length):
    """Independent float64 kernel: K[h, l] = 2 Re sum_n C dB dA^l with ZOH, by explicit powers."""
    dt = np.exp(log_dt)[:, None]
    da = np.exp(dt * a)
    db = (da - 1) / a
    powers = da[:, :, None] ** np.arange(length)[None, None, :]
    return 2 * np.einsum("hn,hnl->hl", c * db, powers).real


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("init", ["lin", "inv", "legs"])
def test_fft_conv_equals_direct_conv_equals_recurrence(length, init):
    rng = np.random.default_rng(length)
    log_dt, a, c, d = random_ssm(rng, channels=3, state_size=8, init=init)
    u = rng.normal(size=(2, length, 3))
    with enable_x64():
        kernel = ssm.s4d_kernel(jnp.asarray(log_dt), jnp.asarray(a), jnp.asarray(c), length)
        assert kernel.dtype == jnp.float64
        np.testing.assert_allclose(
            kernel, numpy_kernel(log_dt, a, c, length), rtol=1e-10, atol=1e-12
        )
        fft = ssm.fft_causal_conv(jnp.asarray(u), kernel) + d * u
        direct = ssm.direct_causal_conv(jnp.asarray(u), kernel) + d * u
        recurrent = ssm.s4d_recurrence(*map(jnp.asarray, (u, log_dt, a, c, d)))
    np.testing.assert_allclose(fft, direct, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fft, recurrent, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk_elements", [4, 12, 4 * 37, 10**9])
def test_chunked_kernel_matches_single_block(chunk_elements):
    rng = np.random.default_rng(0)
    log_dt, a, c, _ = random_ssm(rng, channels=2, state_size=4)
    with enable_x64():
        chunked = ssm.s4d_kernel(
            *map(jnp.asarray, (log_dt, a, c)), 101, chunk_elements=chunk_elements
        )
    np.testing.assert_allclose(chunked, numpy_kernel(log_dt, a, c, 101), rtol=1e-10, atol=1e-12)


def test_kernel_generation_never_holds_full_vandermonde():
    """At D=1152, N=64, L=4096 the (D, N/2, L) complex64 tensor is 1.2 GB; we stay far below."""
    channels, half, length = 1152, 32, 4096
    full_bytes = channels * half * length * 8
    args = (
        jax.ShapeDtypeStruct((channels,), jnp.float32),
        jax.ShapeDtypeStruct((channels, half), jnp.complex64),
        jax.ShapeDtypeStruct((channels, half), jnp.complex64),
    )

    def loss(log_dt, a, c):
        return ssm.s4d_kernel(log_dt, a, c, length).sum()

    forward = jax.jit(lambda *p: ssm.s4d_kernel(*p, length)).lower(*args).compile()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    for compiled in (forward, backward):
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < full_bytes / 10, (temp, full_bytes)


def test_eigenvalue_inits():
    n = np.arange(4)
    np.testing.assert_allclose(ssm.s4d_eigenvalues(8, "lin"), -0.5 + 1j * np.pi * n)
    np.testing.assert_allclose(
        ssm.s4d_eigenvalues(8, "inv"), -0.5 + 1j * (8 / np.pi) * (8 / (2 * n + 1) - 1)
    )
    legs = ssm.s4d_eigenvalues(16, "legs")
    assert legs.shape == (8,)
    np.testing.assert_allclose(legs.real, -0.5, atol=1e-9)
    # Independent check: the eigenvalues of HiPPO-LegS' normal part are those of the
    # skew-symmetric matrix S[n,k] = -sqrt((2n+1)(2k+1))/2 * sign(n-k), shifted by -1/2.
    q = np.sqrt(2 * np.arange(16) + 1)
    skew = -0.5 * np.outer(q, q) * np.sign(np.subtract.outer(np.arange(16), np.arange(16)))
    expected = np.sort(np.linalg.eigvals(skew).imag)[8:]
    np.testing.assert_allclose(np.sort(legs.imag), expected, rtol=1e-8)
    with pytest.raises(ValueError, match="choose one of"):
        ssm.s4d_eigenvalues(8, "hippo")
    with pytest.raises(ValueError, match="even"):
        ssm.s4d_eigenvalues(7)


@pytest.fixture(scope="module")
def bidirectional():
    layer = ssm.BidirectionalSSM(6, ssm.SSMSettings(state_size=8, dt_min=0.01, dt_max=0.5))
    u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 50, 6)), jnp.float32)
    variables = layer.init(jax.random.key(0), u)
    return layer, variables, jax.jit(layer.apply)


def test_layer_parameters_and_init(bidirectional):
    _, variables, _ = bidirectional
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])
    assert set(params) == {"forward", "backward"}
    fwd = params["forward"]
    chex.assert_shape(fwd["c"], (6, 4, 2))
    dt = np.exp(fwd["log_dt"])
    assert np.all((dt >= 0.01) & (dt <= 0.5)) and dt.std() > 0
    np.testing.assert_allclose(-np.exp(fwd["log_a_real"]), -0.5, rtol=1e-6)
    np.testing.assert_allclose(fwd["a_imag"][0], np.pi * np.arange(4), rtol=1e-6)
    np.testing.assert_allclose(fwd["d"], 1.0)
    # Independent directions: different random C and dt.
    assert not np.allclose(fwd["c"], params["backward"]["c"])
    assert 0.3 < np.var(fwd["c"]) < 0.8  # variance 0.5 per part


def test_bidirectional_causality(bidirectional):
    """Perturbing u[l] moves forward outputs only at >= l and backward outputs only at <= l.

    Run in float64 so that "unchanged" can be tested to roundoff (1e-12 of the response);
    a wrap-around from too little FFT padding would show at the far end at full size.
    """
    layer, variables, _ = bidirectional
    u = np.random.default_rng(1).normal(size=(2, 50, 6))
    with enable_x64():
        apply = jax.jit(layer.apply)
        base = apply(variables, jnp.asarray(u))
        chex.assert_shape(base, (2, 50, 12))
        for pos in (0, 17, 49):
            bumped = u.copy()
            bumped[:, pos] += 1.0
            delta = np.abs(np.asarray(apply(variables, jnp.asarray(bumped)) - base)).max(axis=0)
            forward_change, backward_change = delta[:, :6].max(-1), delta[:, 6:].max(-1)
            tol = 1e-12 * delta.max()
            assert np.all(forward_change[:pos] < tol) and forward_change[pos] > 0.1
            assert np.all(backward_change[pos + 1 :] < tol) and backward_change[pos] > 0.1
            # The response propagates past the perturbed position (nothing truncated).
            if pos < 49:
                assert forward_change[pos + 1] > 1e3 * tol
            if pos > 0:
                assert backward_change[pos - 1] > 1e3 * tol


def test_backward_half_is_flipped_forward_of_flipped_input(bidirectional):
    _, variables, apply = bidirectional
    u = jnp.asarray(np.random.default_rng(2).normal(size=(1, 50, 6)), jnp.float32)
    single = ssm.S4D(6, ssm.SSMSettings(state_size=8))
    backward = single.apply({"params": variables["params"]["backward"]}, jnp.flip(u, 1))
    np.testing.assert_allclose(apply(variables, u)[..., 6:], jnp.flip(backward, 1), atol=1e-5)


def test_kernels_are_the_layers_impulse_response(bidirectional):
    """`kernels` (what the notebook plots) is the layer: an impulse at p comes out as
    forward[:, l - p] after p and backward[:, p - l] before it (plus D at p itself)."""
    layer, variables, apply = bidirectional
    forward, backward = layer.apply(variables, 50, method="kernels")
    chex.assert_shape([forward, backward], (6, 50))
    params = nn.meta.unbox(variables)["params"]
    position = 20
    impulse = np.zeros((1, 50, 6), np.float32)
    impulse[0, position] = 1.0
    response = np.asarray(apply(variables, jnp.asarray(impulse)))[0]  # (50, 12)
    expected_forward = np.zeros((50, 6), np.float32)
    expected_forward[position:] = np.asarray(forward[:, : 50 - position]).T
    expected_forward[position] += np.asarray(params["forward"]["d"])
    expected_backward = np.zeros((50, 6), np.float32)
    expected_backward[: position + 1] = np.asarray(backward[:, position::-1]).T
    expected_backward[position] += np.asarray(params["backward"]["d"])
    scale = np.abs(response).max()
    np.testing.assert_allclose(response[:, :6], expected_forward, atol=1e-5 * scale)
    np.testing.assert_allclose(response[:, 6:], expected_backward, atol=1e-5 * scale)
    # The halves differ (independent parameters), so a swap would be caught.
    assert np.abs(np.asarray(forward) - np.asarray(backward)).max() > 0.1 * scale


def test_any_length_and_bfloat16(bidirectional):
    _, variables, apply = bidirectional
    rng = np.random.default_rng(3)
    for length in (1, 33, 128):
        u = jnp.asarray(rng.normal(size=(2, length, 6)), jnp.float32)
        out32 = apply(variables, u)
        out16 = apply(variables, u.astype(jnp.bfloat16))
        assert out16.dtype == jnp.bfloat16 and out16.shape == (2, length, 12)
        # Only the bf16 rounding of input and output differs (kernel and FFT stay in float32):
        # two roundings at 2^-8 relative on values of order |out|.
        scale = float(jnp.abs(out32).max())
        np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=2 * 2**-8 * scale * 4)


def test_bad_input_shape_is_explained():
    layer = ssm.S4D(4)
    with pytest.raises(ValueError, match=r"expects \(B, L, 4\)"):
        layer.init(jax.random.key(0), jnp.ones((2, 10, 5)))
    with pytest.raises(ValueError, match="dt_min"):
        ssm.S4D(4, ssm.SSMSettings(dt_min=0.1, dt_max=0.01)).init(
            jax.random.key(0), jnp.ones((1, 3, 4))
        )


@pytest.mark.parametrize("split", ["one_axis", "two_axes"])
def test_sharded_fft_ssm_transforms_only_each_devices_rows(split):
    """With the batch split over 8 devices, each device transforms its own rows: no all-gather
    in the forward or backward program (XLA's partitioner gathers the whole global batch for a
    plain FFT), and values and gradients equal the unsharded layer's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.asarray(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 (fake) devices")
    if split == "one_axis":
        mesh, spec = Mesh(devices, ("data",)), PartitionSpec("data")
    else:  # as the trainer splits it
        mesh = Mesh(devices.reshape(4, 2), ("data", "fsdp"))
        spec = PartitionSpec(("data", "fsdp"))
    u = jnp.asarray(np.random.default_rng(0).normal(size=(8, 37, 16)), jnp.float32)
    layer = ssm.BidirectionalSSM(16, ssm.SSMSettings(state_size=8))
    variables = layer.init(jax.random.key(0), u)

    def loss(variables, u):
        return jnp.sum(jnp.sin(layer.apply(variables, u)))

    step = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(None, NamedSharding(mesh, spec))
    )
    program = step.lower(variables, u).compile().as_text()
    assert "all-gather" not in program
    (value, grads), (value_ref, grads_ref) = (
        step(variables, u),
        jax.value_and_grad(loss, argnums=(0, 1))(variables, u),
    )
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
