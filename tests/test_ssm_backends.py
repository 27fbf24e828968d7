"""The SSM backends (fft, scan, chunked) against the float64 recurrence, and their gradients."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from diffussm_jax import models, ssm
from diffussm_jax.ssm import kernels


def random_params(seed: int, channels: int = 3, state_size: int = 8, init: str = "lin"):
    """Random float64/complex128 (log_dt (H,), a (H, N/2), c (H, N/2), d (H,)).

    dt up to 0.5 and Re(A) down to -0.05 give both slowly decaying modes (long memory, which a
    missing inter-chunk carry would show) and fast oscillating ones.
    """
    rng = np.random.default_rng(seed)
    half = state_size // 2
    imag = np.broadcast_to(ssm.s4d_eigenvalues(state_size, init).imag, (channels, half))
    a = -rng.uniform(0.05, 1.0, (channels, half)) + 1j * imag
    c = rng.normal(size=(channels, half)) + 1j * rng.normal(size=(channels, half))
    log_dt = np.log(rng.uniform(0.01, 0.5, channels))
    d = rng.normal(size=channels)
    return log_dt, a, c, d


BACKEND_CASES = [
    ssm.SSMSettings(backend="fft"),
    ssm.SSMSettings(backend="scan"),
    ssm.SSMSettings(backend="chunked", chunk_size=16),
    ssm.SSMSettings(backend="chunked", chunk_size=64),
]


@pytest.mark.parametrize("length", [1, 16, 100, 257])
@pytest.mark.parametrize("settings", BACKEND_CASES)
def test_causal_backends_equal_float64_recurrence(settings, length):
    """Lengths cover L < T, L = T, L not a multiple of T, and an odd prime L."""
    params = random_params(length, init="inv" if length == 100 else "lin")
    u = np.random.default_rng(1).normal(size=(2, length, 3))
    with enable_x64():
        params = tuple(map(jnp.asarray, params))
        expected = ssm.s4d_recurrence(jnp.asarray(u), *params)
        run = jax.jit(functools.partial(ssm.causal_ssm, settings=settings))
        got = run(jnp.asarray(u), params)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("settings", BACKEND_CASES)
def test_bidirectional_backends_equal_float64_reference(settings):
    forward, backward = random_params(1), random_params(2)
    u = np.random.default_rng(3).normal(size=(2, 77, 3))
    with enable_x64():
        forward, backward = (tuple(map(jnp.asarray, p)) for p in (forward, backward))
        u = jnp.asarray(u)
        causal = ssm.s4d_recurrence(u, *forward)
        anti = jnp.flip(ssm.s4d_recurrence(jnp.flip(u, 1), *backward), 1)
        run = jax.jit(functools.partial(ssm.bidirectional_ssm, settings=settings))
        got = run(u, forward, backward)
        channels_first = jax.jit(
            functools.partial(ssm.bidirectional_ssm, settings=settings, channels_first=True)
        )(u, forward, backward)
    chex.assert_shape(got, (2, 77, 6))
    np.testing.assert_allclose(got[..., :3], causal, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[..., 3:], anti, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(channels_first, jnp.swapaxes(got, 1, 2))


def test_scan_channel_groups_match_one_group():
    """A state budget of one channel's state forces H groups through lax.map."""
    log_dt, a, c, _ = random_params(4, channels=6)
    u = np.random.default_rng(5).normal(size=(2, 40, 6))
    with enable_x64():
        args = (jnp.asarray(u), *map(jnp.asarray, (log_dt, a, c)))
        run = jax.jit(ssm.scan_causal_ssm, static_argnames="state_elements")
        whole = run(*args)
        grouped = run(*args, state_elements=2 * 40 * 4)
        two_groups = run(*args, state_elements=3 * 2 * 40 * 4)
    np.testing.assert_allclose(grouped, whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(two_groups, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5, 64, 1000])
def test_factored_kernel_equals_vandermonde(length):
    log_dt, a, c, _ = random_params(length, channels=4)
    with enable_x64():
        args = tuple(map(jnp.asarray, (log_dt, a, c)))
        expected = ssm.vandermonde_kernel(*args, length)
        np.testing.assert_allclose(ssm.s4d_kernel(*args, length), expected, rtol=1e-10, atol=1e-12)
        # One channel per group (lax.map over 4 groups).
        grouped = ssm.s4d_kernel(*args, length, chunk_elements=1)
        np.testing.assert_allclose(grouped, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("count,stride", [(1, 1), (5, 1), (32, 1), (33, 32)])
def test_powers_by_squaring_equal_exponentials_with_their_derivative(count, stride):
    """dA^(stride k) by products of squarings, and its JVP and VJP, against exp(stride k log dA)
    differentiated by JAX, in float64."""
    log_dt, a, _, _ = random_params(count, channels=3)
    with enable_x64():
        log_da = jnp.exp(jnp.asarray(log_dt))[:, None] * jnp.asarray(a)

        def reference(z):
            return jnp.exp(z[:, :, None] * (stride * jnp.arange(count)))

        def powers(z):
            return kernels._powers(z, count, stride)

        np.testing.assert_allclose(powers(log_da), reference(log_da), rtol=1e-12, atol=1e-14)
        rng = np.random.default_rng(count)
        tangent = jnp.asarray(rng.normal(size=log_da.shape) + 1j * rng.normal(size=log_da.shape))
        _, jvp = jax.jvp(powers, (log_da,), (tangent,))
        _, jvp_ref = jax.jvp(reference, (log_da,), (tangent,))
        np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-11, atol=1e-13)
        shape = (*log_da.shape, count)
        cotangent = jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape))
        (vjp,) = jax.vjp(powers, log_da)[1](cotangent)
        (vjp_ref,) = jax.vjp(reference, log_da)[1](cotangent)
        np.testing.assert_allclose(vjp, vjp_ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("length", [7, 1000])
def test_factored_kernel_gradient_equals_vandermonde_gradient(length):
    log_dt, a, c, _ = random_params(length, channels=4)
    weights = np.random.default_rng(1).normal(size=(4, length))
    with enable_x64():
        args = tuple(map(jnp.asarray, (log_dt, a, c)))

        def loss(kernel_fn, *args):
            return jnp.sum(jnp.asarray(weights) * kernel_fn(*args, length))

        grads = jax.grad(functools.partial(loss, ssm.s4d_kernel), argnums=(0, 1, 2))(*args)
        expected = jax.grad(functools.partial(loss, ssm.vandermonde_kernel), argnums=(0, 1, 2))(
            *args
        )
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_fft_size():
    sizes = [ssm.fft_size(n) for n in (1, 2, 3, 7, 199, 513, 2047, 4095, 4607, 18431)]
    assert sizes == [1, 2, 3, 8, 240, 576, 2048, 4096, 4608, 18432]
    for n in range(1, 3000):
        size = ssm.fft_size(n)
        odd = size >> (size & -size).bit_length() - 1
        assert size >= n and odd in ssm.FFT_ODD_FACTORS and size < 2 * n


def test_chunked_backend_memory_has_no_length_by_state_tensor():
    """D=1152, L=4096, N=64, B=1: an (H, N/2, L) complex64 tensor would be 1.2 GB.

    What the chunked backend does hold is O(B L H) activations and carried states (19 MB each
    here) and O(H T (T + N)) per-channel matrices (19 MB each): about 190 MB in all.
    """
    channels, half, length = 1152, 32, 4096
    params = (
        jax.ShapeDtypeStruct((channels,), jnp.float32),
        jax.ShapeDtypeStruct((channels, half), jnp.complex64),
        jax.ShapeDtypeStruct((channels, half), jnp.complex64),
        jax.ShapeDtypeStruct((channels,), jnp.float32),
    )
    u = jax.ShapeDtypeStruct((1, length, channels), jnp.float32)

    def loss(u, params):
        return ssm.causal_ssm(u, params, ssm.SSMSettings(backend="chunked")).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(u, params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < channels * half * length * 8 / 5


# ----------------------------------------------------------------------------- layers


@pytest.fixture(scope="module")
def layer_and_params():
    u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 45, 6)), jnp.float32)
    layer = ssm.BidirectionalSSM(6, ssm.SSMSettings(state_size=8, dt_min=0.01, dt_max=0.5))
    variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), u))
    # Perturbed dynamics, C and D so that every path of the gradient carries signal.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(0.1 * rng.normal(size=p.shape), jnp.float32),
        variables["params"],
    )
    return u, params


@pytest.mark.parametrize("backend", ssm.BACKENDS)
def test_layer_backends_share_parameters_and_agree(layer_and_params, backend):
    u, params = layer_and_params
    layer = ssm.BidirectionalSSM(6, ssm.SSMSettings(state_size=8, backend=backend, chunk_size=16))
    fresh = jax.eval_shape(layer.init, jax.random.key(0), u)
    chex.assert_trees_all_equal_shapes_and_dtypes(nn.meta.unbox(fresh)["params"], params)
    reference = jax.jit(ssm.BidirectionalSSM(6, ssm.SSMSettings(state_size=8)).apply)(
        {"params": params}, u
    )
    got = jax.jit(layer.apply)({"params": params}, u)
    np.testing.assert_allclose(got, reference, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["scan", "chunked"])
def test_gradients_match_fft_backend(layer_and_params, backend):
    """d loss / d (params, u) in float32 against the fft backend."""
    u, params = layer_and_params
    weights = jnp.asarray(np.random.default_rng(6).normal(size=(2, 45, 12)), jnp.float32)

    def grads(backend):
        layer = ssm.BidirectionalSSM(
            6, ssm.SSMSettings(state_size=8, backend=backend, chunk_size=16)
        )
        loss = lambda p, u: jnp.sum(weights * layer.apply({"params": p}, u))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, u)

    expected, got = grads("fft"), grads(backend)
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        have = functools.reduce(lambda t, k: t[k.key if hasattr(k, "key") else k.idx], path, got)
        scale = float(jnp.abs(want).max())
        assert scale > 0, path
        np.testing.assert_allclose(have, want, atol=1e-4 * scale, err_msg=str(path))


def test_fft_gradient_equals_float64_recurrence_gradient():
    """The fft backend's float32 gradient against autodiff of the float64 recurrence."""
    params = random_params(7)
    u = np.random.default_rng(8).normal(size=(1, 60, 3))
    weights = np.random.default_rng(9).normal(size=(1, 60, 3))

    def loss(fn, u, params):
        return jnp.sum(weights * fn(u, params))

    recurrence = lambda u, p: ssm.s4d_recurrence(u, *p)
    with enable_x64():
        expected = jax.jit(jax.grad(functools.partial(loss, recurrence), argnums=(0, 1)))(
            jnp.asarray(u), tuple(map(jnp.asarray, params))
        )
    cast = lambda x: jnp.asarray(x, jnp.complex64 if np.iscomplexobj(x) else jnp.float32)
    got = jax.jit(jax.grad(functools.partial(loss, ssm.causal_ssm), argnums=(0, 1)))(
        cast(u), tuple(map(cast, params))
    )
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=2e-4 * scale)


def test_chunked_bfloat16_and_unknown_backend(layer_and_params):
    u, params = layer_and_params
    layer = ssm.BidirectionalSSM(6, ssm.SSMSettings(state_size=8, backend="chunked", chunk_size=16))
    apply = jax.jit(layer.apply)
    out32 = apply({"params": params}, u)
    out16 = apply({"params": params}, u.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    # bf16 rounding of the input, the matmul operands (taps, state) and the output.
    scale = float(jnp.abs(out32).max())
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=4 * 2**-8 * scale)
    with pytest.raises(ValueError, match="choose one of"):
        layer = ssm.BidirectionalSSM(6, ssm.SSMSettings(state_size=8, backend="conv"))
        layer.apply({"params": params}, u)


def test_diffussm_ssm_backend_setting():
    kw = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=16, depth=1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
    t, y = jnp.array([3, 500]), jnp.array([1, 10])
    fft_model = models.create("DiffuSSM-S", ssm=ssm.SSMSettings(state_size=8), **kw)
    # Random values for every parameter (no compiled init: it costs more than the applies) also
    # break adaLN-Zero, so the blocks and their SSMs reach the output.
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32),
        models.abstract_params(fft_model),
    )
    expected = jax.jit(fft_model.apply)({"params": params}, x, t, y)
    assert float(jnp.abs(expected).max()) > 0.1
    for backend in ("scan", "chunked"):
        settings = ssm.SSMSettings(state_size=8, backend=backend)
        model = models.create("DiffuSSM-S", ssm=settings, **kw)
        got = jax.jit(model.apply)({"params": params}, x, t, y)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=backend)
