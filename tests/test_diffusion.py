"""Op-level tests of the diffusion math against independent float64 numpy/scipy formulas.

The references here are derived differently from the library where possible (posterior by Gaussian
precision algebra rather than the coefficient form, KL as cross-entropy minus entropy, the decoder
likelihood from scipy's normal CDF), so a shared mistake is unlikely.
"""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffussm_jax import diffusion

# ---------------------------------------------------------------------------------------------
# Schedules


def _reference_linear_alpha_bar(num_timesteps):
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)
    return betas, np.cumprod(1.0 - betas)


def test_linear_schedule_endpoints_and_rescaling():
    np.testing.assert_allclose(diffusion.linear_betas(1000)[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    # At T=100 the endpoints scale by 10 so alpha_bar_T is as small as at T=1000.
    np.testing.assert_allclose(diffusion.linear_betas(100)[[0, -1]], [1e-3, 0.2], rtol=1e-12)
    d = diffusion.create()
    assert d.num_timesteps == 1000 and d.learn_sigma and d.loss == "hybrid"
    assert d.alphas_cumprod[-1] < 1e-4


def test_cosine_schedule_alpha_bar():
    d = diffusion.create(num_timesteps=200, schedule="cosine")
    s = np.arange(1, 201) / 200
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = f(s) / f(0.0)
    # The last beta is capped at 0.999, so compare where the cap is inactive.
    np.testing.assert_allclose(d.alphas_cumprod[:-1], expected[:-1], rtol=1e-10)
    assert d.betas[-1] == pytest.approx(0.999)


def test_create_validates_loss_and_sigma():
    with pytest.raises(ValueError, match="learn_sigma"):
        diffusion.create(learn_sigma=False, loss="hybrid")
    assert diffusion.create(learn_sigma=False).loss == "mse"
    with pytest.raises(ValueError, match="schedule"):
        diffusion.create(schedule="quadratic")


# ---------------------------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_float64():
    _betas, alpha_bar = _reference_linear_alpha_bar(1000)
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 3, 2, 2, 4))
    t = np.array([0, 617, 999])
    expected = (
        np.sqrt(alpha_bar[t])[:, None, None, None] * x0
        + np.sqrt(1 - alpha_bar[t])[:, None, None, None] * noise
    )
    with jax.enable_x64(True):
        got = diffusion.q_sample(diffusion.create(), jnp.asarray(x0), jnp.asarray(t), noise)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_posterior_mean_variance_float64():
    """q(x_{t-1} | x_t, x_0) by completing the square: prior N(sqrt(ab') x0, 1 - ab') on x_{t-1}
    times the likelihood N(x_t; sqrt(1 - beta) x_{t-1}, beta)."""
    betas, alpha_bar = _reference_linear_alpha_bar(1000)
    rng = np.random.default_rng(1)
    x0, xt = rng.normal(size=(2, 4, 2, 2, 3))
    t = np.array([0, 1, 400, 999])
    prev = np.concatenate([[1.0], alpha_bar[:-1]])[t]
    beta = betas[t]
    with np.errstate(divide="ignore"):
        precision = 1.0 / (1.0 - prev) + (1.0 - beta) / beta
    variance = np.where(t == 0, 0.0, 1.0 / precision)
    mean_t = variance[:, None, None, None] * (
        (np.sqrt(prev) / np.where(t == 0, 1.0, 1.0 - prev))[:, None, None, None] * x0
        + (np.sqrt(1.0 - beta) / beta)[:, None, None, None] * xt
    )
    # At t = 0 the posterior is a point mass at x_0.
    expected_mean = np.where((t == 0)[:, None, None, None], x0, mean_t)
    variance_at_1 = 1.0 / (1.0 / (1.0 - alpha_bar[0]) + (1.0 - betas[1]) / betas[1])
    expected_log_clipped = np.log(np.where(t == 0, variance_at_1, variance))

    with jax.enable_x64(True):
        mean, var, log_var = diffusion.q_posterior_mean_variance(
            diffusion.create(), jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(t)
        )
        chex.assert_shape(var, (4, 1, 1, 1))
        np.testing.assert_allclose(np.asarray(mean), expected_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(var).ravel(), variance, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(np.asarray(log_var).ravel(), expected_log_clipped, rtol=1e-9)


def test_p_mean_variance_learned_range_float64():
    d = diffusion.create()
    betas, alpha_bar = _reference_linear_alpha_bar(1000)
    rng = np.random.default_rng(2)
    xt, eps = rng.normal(size=(2, 3, 2, 2, 2))
    v = np.stack([np.full((2, 2, 2), -1.0), np.full((2, 2, 2), 1.0), rng.uniform(-1, 1, (2, 2, 2))])
    t = np.array([5, 250, 998])
    ab, ab_prev, beta = alpha_bar[t], alpha_bar[t - 1], betas[t]
    x0 = (xt - np.sqrt(1 - ab)[:, None, None, None] * eps) / np.sqrt(ab)[:, None, None, None]
    posterior_var = beta * (1 - ab_prev) / (1 - ab)
    expected_mean = (np.sqrt(ab_prev) * beta / (1 - ab))[:, None, None, None] * x0 + (
        np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
    )[:, None, None, None] * xt
    frac = (v + 1) / 2
    expected_log_var = (
        frac * np.log(beta)[:, None, None, None]
        + (1 - frac) * np.log(posterior_var)[:, None, None, None]
    )
    with jax.enable_x64(True):
        out = diffusion.p_mean_variance(
            d, jnp.asarray(np.concatenate([eps, v], -1)), jnp.asarray(xt), jnp.asarray(t)
        )
        np.testing.assert_allclose(np.asarray(out["pred_xstart"]), x0, rtol=1e-9)
        np.testing.assert_allclose(np.asarray(out["mean"]), expected_mean, rtol=1e-9)
        np.testing.assert_allclose(np.asarray(out["log_variance"]), expected_log_var, rtol=1e-9)
        # v = -1 and v = +1 hit the two bounds exactly.
        np.testing.assert_allclose(np.asarray(out["log_variance"])[1], np.log(beta[1]), rtol=1e-12)

        fixed = diffusion.create(learn_sigma=False)
        out_fixed = diffusion.p_mean_variance(fixed, jnp.asarray(eps), jnp.asarray(xt), t)
        np.testing.assert_allclose(np.asarray(out_fixed["log_variance"]).ravel(), np.log(beta))


def test_normal_kl_float64():
    rng = np.random.default_rng(3)
    mean1, mean2 = rng.normal(size=(2, 50))
    std1, std2 = rng.uniform(0.05, 3.0, size=(2, 50))
    # KL = cross-entropy - entropy, both from scipy.
    cross_entropy = 0.5 * np.log(2 * np.pi * std2**2) + (std1**2 + (mean1 - mean2) ** 2) / (
        2 * std2**2
    )
    expected = cross_entropy - stats.norm(mean1, std1).entropy()
    with jax.enable_x64(True):
        got = diffusion.normal_kl(mean1, 2 * np.log(std1), mean2, 2 * np.log(std2))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)


def test_discretized_gaussian_log_likelihood_float64():
    levels = np.arange(256) / 127.5 - 1.0  # the 256 values of 8-bit data mapped to [-1, 1]
    for mean, std in [(0.1, 0.05), (-0.7, 0.4), (0.98, 0.01), (0.0, 1.5)]:
        lower = np.where(levels < -0.999, -np.inf, levels - 1 / 255)
        upper = np.where(levels > 0.999, np.inf, levels + 1 / 255)
        mass = stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std)
        expected = np.log(np.maximum(mass, 1e-12))
        with jax.enable_x64(True):
            got = np.asarray(
                diffusion.discretized_gaussian_log_likelihood(
                    jnp.asarray(levels), jnp.asarray(mean), jnp.asarray(np.log(std))
                )
            )
        resolved = mass > 1e-10  # below that, cancellation in the scipy reference dominates
        np.testing.assert_allclose(got[resolved], expected[resolved], rtol=1e-7, atol=1e-9)
        assert np.all(got[~resolved] <= np.log(1e-10) + 1e-6)
        # The bins partition the real line.
        np.testing.assert_allclose(np.exp(got).sum(), 1.0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Respacing


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,15,20", "logsnr20", "1000"])
def test_respacing_keeps_alpha_bar(spec):
    base = diffusion.create()
    spaced = diffusion.respace(base, spec)
    np.testing.assert_allclose(
        spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12
    )
    assert np.all(np.diff(spaced.timestep_map) > 0)
    assert spaced.learn_sigma and spaced.original_num_timesteps == 1000


def test_ddim_spacing_is_evenly_strided():
    np.testing.assert_array_equal(diffusion.space_timesteps(1000, "ddim50"), np.arange(0, 1000, 20))
    np.testing.assert_array_equal(diffusion.space_timesteps(1000, "ddim25"), np.arange(0, 1000, 40))
    with pytest.raises(ValueError, match="stride"):
        diffusion.space_timesteps(10, "ddim7")  # strides 1, 2, 3 give 10, 5, 4 steps


def test_even_and_sectioned_spacing():
    kept = diffusion.space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}
    # Sections of 334, 333, 333 steps get 10, 15 and 20 steps, each spanning its section.
    kept = diffusion.space_timesteps(1000, "10,15,20")
    bounds = [0, 334, 667, 1000]
    for (lo, hi), count in zip(itertools.pairwise(bounds), [10, 15, 20], strict=True):
        inside = kept[(kept >= lo) & (kept < hi)]
        assert len(inside) == count and inside[0] == lo and inside[-1] == hi - 1


def test_logsnr_spacing_is_even_in_log_snr():
    base = diffusion.create()
    kept = diffusion.space_timesteps(1000, "logsnr20", base.alphas_cumprod)
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == 999
    log_snr = np.log(base.alphas_cumprod / (1 - base.alphas_cumprod))[kept]
    # Away from t = 0 (where integer steps are coarser than the grid) the increments are even.
    increments = np.diff(log_snr)[3:]
    np.testing.assert_allclose(increments, increments.mean(), rtol=0.1)


def test_respacing_composes_to_original_steps():
    base = diffusion.create()
    twice = diffusion.respace(diffusion.respace(base, "250"), "ddim25")
    once = diffusion.respace(base, "250")
    np.testing.assert_array_equal(twice.timestep_map, once.timestep_map[np.arange(0, 250, 10)])
    np.testing.assert_allclose(
        twice.alphas_cumprod, base.alphas_cumprod[twice.timestep_map], rtol=1e-12
    )
    assert diffusion.create(timestep_respacing="250").timestep_map[-1] == 999


# ---------------------------------------------------------------------------------------------
# Losses


def _reference_hybrid_losses(num_timesteps, x0, noise, t, model_output):
    """improved-DDPM's hybrid loss in float64 numpy/scipy, written out step by step."""
    betas, alpha_bar = _reference_linear_alpha_bar(num_timesteps)
    expand = lambda a: a[:, None, None, None]
    ab = alpha_bar[t]
    ab_prev = np.concatenate([[1.0], alpha_bar[:-1]])[t]
    beta = betas[t]
    xt = expand(np.sqrt(ab)) * x0 + expand(np.sqrt(1 - ab)) * noise
    channels = x0.shape[-1]
    eps, v = model_output[..., :channels], model_output[..., channels:]
    mse = np.mean((noise - eps) ** 2, axis=(1, 2, 3))

    posterior_var = beta * (1 - ab_prev) / (1 - ab)
    posterior_var_1 = betas[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1])
    log_posterior_var = np.log(np.where(t == 0, posterior_var_1, posterior_var))
    coef_x0 = np.sqrt(ab_prev) * beta / (1 - ab)
    coef_xt = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
    true_mean = expand(coef_x0) * x0 + expand(coef_xt) * xt
    x0_hat = (xt - expand(np.sqrt(1 - ab)) * eps) / expand(np.sqrt(ab))
    model_mean = expand(coef_x0) * x0_hat + expand(coef_xt) * xt
    frac = (v + 1) / 2
    model_log_var = frac * expand(np.log(beta)) + (1 - frac) * expand(log_posterior_var)

    true_var, model_var = expand(np.exp(log_posterior_var)), np.exp(model_log_var)
    kl = 0.5 * (
        np.log(model_var / true_var) + (true_var + (true_mean - model_mean) ** 2) / model_var - 1
    )
    kl_bits = np.mean(kl, axis=(1, 2, 3)) / np.log(2)

    std = np.sqrt(model_var)
    lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    mass = stats.norm.cdf(upper, model_mean, std) - stats.norm.cdf(lower, model_mean, std)
    nll_bits = -np.mean(np.log(np.maximum(mass, 1e-12)), axis=(1, 2, 3)) / np.log(2)

    vb = np.where(t == 0, nll_bits, kl_bits) * num_timesteps / 1000
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def test_hybrid_loss_matches_numpy_float64():
    num_timesteps = 100  # the VB term is scaled by T / 1000 = 0.1 here
    rng = np.random.default_rng(4)
    x0 = np.round(rng.uniform(-1, 1, size=(4, 3, 3, 2)) * 127.5) / 127.5
    x0[0, 0, 0] = [-1.0, 1.0]  # the two open-ended bins of the decoder
    noise = rng.normal(size=x0.shape)
    # Model outputs near the truth, so the decoder's bins hold non-negligible mass.
    model_output = np.concatenate(
        [noise + 0.05 * rng.normal(size=x0.shape), rng.uniform(-1, 1, x0.shape)], -1
    )
    t = np.array([0, 1, 37, 99])
    expected = _reference_hybrid_losses(num_timesteps, x0, noise, t, model_output)
    d = diffusion.create(num_timesteps=num_timesteps)

    def losses(*args):
        seen = {}

        def model_fn(x, t_model, y):
            seen["t"] = t_model
            return jnp.asarray(model_output)

        return diffusion.training_losses(model_fn, d, *args), seen["t"]

    with jax.enable_x64(True):
        got, seen_t = jax.jit(losses)(x0, t, noise)
        for name in ("loss", "mse", "vb"):
            chex.assert_shape(got[name], (4,))
            np.testing.assert_allclose(np.asarray(got[name]), expected[name], rtol=1e-8)
    np.testing.assert_array_equal(np.asarray(seen_t), t)
    assert expected["vb"][0] > 0 and expected["vb"][1:].min() > 0


def test_training_losses_call_model_on_original_scale():
    d = diffusion.create(timestep_respacing="ddim10")
    x0 = jnp.zeros((3, 2, 2, 1))

    def model_t(t):
        seen = {}

        def model_fn(x, t_model, y):
            seen["t"] = t_model
            return jnp.zeros((*x.shape[:-1], 2 * x.shape[-1]))

        diffusion.training_losses(model_fn, d, x0, t, jnp.ones_like(x0))
        return seen["t"]

    np.testing.assert_array_equal(np.asarray(jax.jit(model_t)(jnp.array([0, 4, 9]))), [0, 400, 900])


def test_mse_loss_option():
    d = diffusion.create(loss="mse")
    x0 = jnp.full((2, 2, 2, 1), 0.3)
    noise = jnp.ones_like(x0)
    output = jnp.concatenate([jnp.full_like(x0, 0.5), jnp.full_like(x0, 0.9)], -1)
    got = diffusion.losses_from_model_output(
        d,
        output,
        x0,
        diffusion.q_sample(d, x0, jnp.array([3, 900]), noise),
        jnp.array([3, 900]),
        noise,
    )
    np.testing.assert_allclose(np.asarray(got["mse"]), [0.25, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["vb"]), 0.0)
    np.testing.assert_array_equal(np.asarray(got["loss"]), np.asarray(got["mse"]))


def test_vb_term_gives_no_gradient_to_eps_channels():
    d = diffusion.create()
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 2)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([0, 10, 500])
    xt = diffusion.q_sample(d, x0, t, noise)
    output = jnp.asarray(rng.normal(size=(3, 4, 4, 4)), jnp.float32)

    def term(name):
        return lambda out: diffusion.losses_from_model_output(d, out, x0, xt, t, noise)[name].sum()

    grad_vb, grad_mse = jax.jit(
        lambda out: (jax.grad(term("vb"))(out), jax.grad(term("mse"))(out))
    )(output)
    np.testing.assert_array_equal(np.asarray(grad_vb[..., :2]), 0.0)
    assert np.all(np.abs(np.asarray(grad_vb[..., 2:])).sum(axis=(1, 2, 3)) > 0)
    np.testing.assert_array_equal(np.asarray(grad_mse[..., 2:]), 0.0)
    assert np.abs(np.asarray(grad_mse[..., :2])).sum() > 0


def test_timestep_bucket_losses():
    values = jnp.array([1.0, 2.0, 3.0, 4.0, 10.0])
    t = jnp.array([0, 249, 250, 999, 998])
    got = jax.jit(diffusion.timestep_bucket_losses, static_argnums=(2, 3))(values, t, 1000, 4)
    np.testing.assert_allclose(np.asarray(got["sum"]), [3.0, 3.0, 0.0, 14.0])
    np.testing.assert_allclose(np.asarray(got["count"]), [2, 1, 0, 2])
    mean = np.asarray(got["mean"])
    np.testing.assert_allclose(mean[[0, 1, 3]], [1.5, 3.0, 7.0])
    assert math.isnan(mean[2])


def test_sample_timesteps_uniform_range():
    d = diffusion.create(timestep_respacing="ddim10")
    t = diffusion.sample_timesteps(jax.random.key(0), 4096, d)
    assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 9
    counts = np.bincount(np.asarray(t), minlength=10)
    assert np.all(np.abs(counts - 409.6) < 5 * np.sqrt(409.6))


# ---------------------------------------------------------------------------------------------
# Prediction targets (eps, v, x0) and loss weighting


def _rotation_reference(alpha_bar, x0, eps):
    """x_t and v from (x_0, eps) as the rotation [[a, s], [-s, a]] of the pair, and its inverse by
    a generic linear solve (not the transposed closed form the library uses)."""
    a, s = np.sqrt(alpha_bar)[:, None], np.sqrt(1 - alpha_bar)[:, None]
    flat_x0, flat_eps = x0.reshape(len(x0), -1), eps.reshape(len(eps), -1)
    xt, v = a * flat_x0 + s * flat_eps, -s * flat_x0 + a * flat_eps
    recovered = np.stack(
        [
            np.linalg.solve(
                np.array([[a[i, 0], s[i, 0]], [-s[i, 0], a[i, 0]]]), np.stack([xt[i], v[i]])
            )
            for i in range(len(x0))
        ]
    )  # (B, 2, D): x_0 and eps back from (x_t, v)
    shape = x0.shape
    return (
        xt.reshape(shape),
        v.reshape(shape),
        recovered[:, 0].reshape(shape),
        recovered[:, 1].reshape(shape),
    )


def test_v_and_x0_conversions_float64():
    _betas, alpha_bar = _reference_linear_alpha_bar(1000)
    rng = np.random.default_rng(6)
    x0, eps = rng.normal(size=(2, 4, 3, 2, 2))
    t = np.array([0, 1, 500, 999])
    xt, v, x0_back, eps_back = _rotation_reference(alpha_bar[t], x0, eps)
    # The reference inverts itself.
    np.testing.assert_allclose(x0_back, x0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(eps_back, eps, rtol=1e-10, atol=1e-12)
    with jax.enable_x64(True):
        t = jnp.asarray(t)
        for prediction in ("eps", "v", "x0"):
            d = diffusion.create(prediction=prediction)
            np.testing.assert_allclose(
                np.asarray(diffusion.q_sample(d, x0, t, eps)), xt, rtol=1e-12
            )
            target = np.asarray(
                diffusion.prediction_target(d, jnp.asarray(x0), t, jnp.asarray(eps))
            )
            np.testing.assert_allclose(
                target, {"eps": eps, "v": v, "x0": x0}[prediction], rtol=1e-12, atol=1e-14
            )
            # The model's exact prediction converts back to the true (eps, x_0).
            got_eps, got_x0 = diffusion.eps_and_xstart(d, jnp.asarray(target), jnp.asarray(xt), t)
            assert got_eps.dtype == jnp.float64
            # x0 prediction at t = 0 divides by sqrt(1 - alpha_bar_0) = 0.01: 1e-10 relative.
            np.testing.assert_allclose(np.asarray(got_x0), x0, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(np.asarray(got_eps), eps, rtol=1e-10, atol=1e-10)
        d = diffusion.create(prediction="v")
        np.testing.assert_allclose(
            np.asarray(diffusion.v_from_xstart_and_eps(d, jnp.asarray(x0), t, jnp.asarray(eps))),
            v,
            rtol=1e-12,
            atol=1e-14,
        )
        np.testing.assert_allclose(
            np.asarray(diffusion.predict_xstart_from_v(d, jnp.asarray(xt), t, jnp.asarray(v))),
            x0,
            rtol=1e-10,
            atol=1e-12,
        )
        np.testing.assert_allclose(
            np.asarray(diffusion.predict_eps_from_v(d, jnp.asarray(xt), t, jnp.asarray(v))),
            eps,
            rtol=1e-10,
            atol=1e-12,
        )


@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_is_the_same_for_equivalent_predictions(clip):
    """An eps, v or x0 model that implies the same x_0 gives the same reverse step."""
    d = {p: diffusion.create(prediction=p) for p in ("eps", "v", "x0")}
    _betas, alpha_bar = _reference_linear_alpha_bar(1000)
    rng = np.random.default_rng(7)
    xt, eps = rng.normal(size=(2, 3, 2, 2, 2))
    var_values = rng.uniform(-1, 1, size=xt.shape)
    t = np.array([3, 400, 990])
    a = np.sqrt(alpha_bar[t])[:, None, None, None]
    s = np.sqrt(1 - alpha_bar[t])[:, None, None, None]
    x0 = (xt - s * eps) / a
    outputs = {"eps": eps, "x0": x0, "v": a * eps - s * x0}
    with jax.enable_x64(True):
        steps = {
            p: diffusion.p_mean_variance(
                d[p],
                jnp.asarray(np.concatenate([outputs[p], var_values], -1)),
                jnp.asarray(xt),
                jnp.asarray(t),
                clip_denoised=clip,
            )
            for p in d
        }
    expected_x0 = np.clip(x0, -1, 1) if clip else x0
    for p, step in steps.items():
        np.testing.assert_allclose(
            np.asarray(step["pred_xstart"]), expected_x0, rtol=1e-9, atol=1e-12, err_msg=p
        )
        np.testing.assert_allclose(np.asarray(step["eps"]), eps, rtol=1e-9, atol=1e-12, err_msg=p)
        for name in ("mean", "log_variance"):
            np.testing.assert_allclose(
                np.asarray(step[name]),
                np.asarray(steps["eps"][name]),
                rtol=1e-9,
                atol=1e-12,
                err_msg=p,
            )


def _reference_weights(alpha_bar, prediction, weighting, gamma):
    """Min-SNR weights written from the issue's table, per example."""
    snr = alpha_bar / (1 - alpha_bar)
    if weighting == "none":
        return np.ones_like(snr)
    return {
        "eps": np.minimum(snr, gamma) / snr,
        "v": np.minimum(snr, gamma) / (snr + 1),
        "x0": np.minimum(snr, gamma),
    }[prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_weighted_losses_match_numpy_float64(prediction, weighting):
    """loss = w_t * mean((target - prediction)^2) + vb on fixed inputs, against numpy.

    The model's mean channels are a noisy version of the prediction target. The VLB term of the
    hybrid loss depends only on the x_0 the prediction implies, so it equals the eps reference
    evaluated with the equivalent eps output.
    """
    num_timesteps, gamma = 100, 3.0
    _betas, alpha_bar = _reference_linear_alpha_bar(num_timesteps)
    rng = np.random.default_rng(8)
    x0 = np.round(rng.uniform(-1, 1, size=(4, 3, 3, 2)) * 127.5) / 127.5
    noise = rng.normal(size=x0.shape)
    # SNR from ~1e3 down to ~4e-5: both sides of gamma = 3.
    t = np.array([0, 9, 30, 99])
    a = np.sqrt(alpha_bar[t])[:, None, None, None]
    s = np.sqrt(1 - alpha_bar[t])[:, None, None, None]
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    predicted = target + 0.05 * rng.normal(size=x0.shape)
    var_values = rng.uniform(-1, 1, x0.shape)
    # The same model as an eps-predictor: convert its implied x_0.
    xt = a * x0 + s * noise
    implied_x0 = {"eps": (xt - s * predicted) / a, "x0": predicted, "v": a * xt - s * predicted}[
        prediction
    ]
    implied_eps = (xt - a * implied_x0) / s
    eps_reference = _reference_hybrid_losses(
        num_timesteps, x0, noise, t, np.concatenate([implied_eps, var_values], -1)
    )
    mse = np.mean((target - predicted) ** 2, axis=(1, 2, 3))
    weights = _reference_weights(alpha_bar[t], prediction, weighting, gamma)
    if weighting == "min_snr":
        assert weights.min() < weights.max()  # the weighting is not constant on these inputs

    d = diffusion.create(
        num_timesteps=num_timesteps,
        prediction=prediction,
        loss_weighting=weighting,
        min_snr_gamma=gamma,
    )
    with jax.enable_x64(True):
        model_output = jnp.asarray(np.concatenate([predicted, var_values], -1))
        got = diffusion.training_losses(
            lambda x, t, y: model_output, d, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)
        )
        np.testing.assert_allclose(np.asarray(got["mse"]), mse, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(got["vb"]), eps_reference["vb"], rtol=1e-7)
        np.testing.assert_allclose(
            np.asarray(got["loss"]), weights * mse + eps_reference["vb"], rtol=1e-7
        )
    np.testing.assert_allclose(diffusion.mse_weights(d)[t], weights, rtol=1e-12)


def test_prediction_and_weighting_are_validated_and_kept_by_respacing():
    with pytest.raises(ValueError, match="prediction"):
        diffusion.create(prediction="score")
    with pytest.raises(ValueError, match="loss_weighting"):
        diffusion.create(loss_weighting="p2")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion.create(loss_weighting="min_snr", min_snr_gamma=0.0)
    d = diffusion.create(
        prediction="v", loss_weighting="min_snr", min_snr_gamma=2.0, timestep_respacing="ddim10"
    )
    assert (d.prediction, d.loss_weighting, d.min_snr_gamma) == ("v", "min_snr", 2.0)
    # The respaced chain's weights are the original chain's at the kept steps.
    full = diffusion.create(prediction="v", loss_weighting="min_snr", min_snr_gamma=2.0)
    np.testing.assert_allclose(
        diffusion.mse_weights(d), diffusion.mse_weights(full)[d.timestep_map], rtol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# Flow matching (linear interpolant)


def test_flow_interpolant_and_loss_float64():
    rng = np.random.default_rng(9)
    x0, eps = rng.normal(size=(2, 3, 2, 2, 2))
    t = np.array([0.0, 0.3, 1.0])
    velocity = rng.normal(size=x0.shape)
    seen = {}

    def model_fn(x, t_model, y):
        seen["x"], seen["t"] = x, t_model
        return jnp.asarray(velocity)

    expected_xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    expected = np.mean((velocity - (eps - x0)) ** 2, axis=(1, 2, 3))
    flow = diffusion.create_flow()
    with jax.enable_x64(True):
        got = diffusion.training_losses(
            model_fn, flow, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps)
        )
        np.testing.assert_allclose(np.asarray(seen["x"]), expected_xt, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(np.asarray(got["loss"]), expected, rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(got["mse"]), np.asarray(got["loss"]))
        np.testing.assert_array_equal(np.asarray(got["vb"]), 0.0)
        # x_0 = x_t - t v recovers the data from the true velocity.
        x0_back = diffusion.flow.predict_xstart(
            jnp.asarray(expected_xt), jnp.asarray(t), jnp.asarray(eps - x0)
        )
        np.testing.assert_allclose(np.asarray(x0_back), x0, rtol=1e-12, atol=1e-14)
    # The contract: the model sees t as float32 (B,) in [0, 1].
    assert seen["t"].dtype == jnp.float32 and seen["t"].shape == (3,)
    np.testing.assert_array_equal(np.asarray(seen["t"]), t.astype(np.float32))


@pytest.mark.parametrize(
    ("t_sampling", "logit_mean", "logit_std"), [("uniform", 0.0, 1.0), ("logit_normal", 0.5, 0.8)]
)
def test_flow_time_sampling(t_sampling, logit_mean, logit_std):
    flow = diffusion.create_flow(t_sampling=t_sampling, logit_mean=logit_mean, logit_std=logit_std)
    n = 8192
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), n, flow), np.float64)
    assert t.shape == (n,) and t.min() >= 0.0 and t.max() <= 1.0
    if t_sampling == "uniform":
        # U[0, 1): mean 1/2, variance 1/12; the variance of (t - 1/2)^2 is 1/180.
        assert abs(t.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
        assert abs(t.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    else:
        logits = np.log(t) - np.log1p(-t)
        assert abs(logits.mean() - logit_mean) < 5 * logit_std / np.sqrt(n)
        assert abs(logits.std() - logit_std) < 5 * logit_std / np.sqrt(2 * (n - 1))


def test_create_flow_validates():
    with pytest.raises(ValueError, match="t_sampling"):
        diffusion.create_flow(t_sampling="cosmap")
    with pytest.raises(ValueError, match="logit_std"):
        diffusion.create_flow(t_sampling="logit_normal", logit_std=0.0)


def test_timestep_bucket_losses_of_flow_times():
    values = jnp.array([1.0, 2.0, 3.0, 4.0, 10.0])
    t = jnp.array([0.0, 0.2499, 0.25, 0.9, 1.0])  # t = 1 belongs to the last quartile
    got = jax.jit(diffusion.timestep_bucket_losses, static_argnums=(2, 3))(values, t, 1.0, 4)
    np.testing.assert_allclose(np.asarray(got["count"]), [2, 1, 0, 2])
    np.testing.assert_allclose(np.asarray(got["sum"]), [3.0, 3.0, 0.0, 14.0])
