"""System-level tests of the samplers: analytic denoisers, guidance, determinism, sharding.

The analytic model is the exact predictor for known data distributions, applied per channel:
channel 0 holds N(0.7, 0.5^2) data, channel 1 a two-component Gaussian mixture. For the Gaussian
process it is E[eps | x_t], handed to the sampler as eps, v or x_0 (each prediction type); for the
flow process it is the exact velocity E[eps - x_0 | x_t]. With the exact predictor a correct
sampler reproduces the data up to its discretisation error:
  - Gaussian channel: every sampler step is affine in x plus independent noise, so the output
    moments of the discrete sampler are computed exactly by a scalar recursion written here; the
    samples must match it within a few standard errors (no discretisation allowance at all).
  - Mixture channel: mean, variance and mode masses against the true values, within a few
    standard errors plus a per-sampler discretisation allowance: stated for the Gaussian
    samplers; for the flow's ODE samplers computed in float64 by quadrature of the discrete
    sampler's deterministic map at the step count under test.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from diffussm_jax import diffusion

# Per channel: component weights, means, standard deviations (channel 0 is one Gaussian written
# as two identical components so both channels share the code).
WEIGHTS = np.array([[0.5, 0.5], [0.3, 0.7]])
MEANS = np.array([[0.7, 0.7], [-1.0, 1.2]])
STDS = np.array([[0.5, 0.5], [0.15, 0.3]])
MODE_THRESHOLD = 0.1  # between the mixture's modes; the mass below it is the low mode's
ANALYTIC_SHAPE = (128, 16, 16, 2)  # 32768 independent scalars per channel
NUM_SIGMAS = 5.0  # sampling tolerance in standard errors: a false alarm is ~1e-6 per check


def key(seed):
    """An "rbg" PRNG key: a threefry program takes ~3.5 s to compile on CPU, rbg ~0.4 s.

    The samplers treat both key types alike; the sharding test uses threefry, whose values do not
    depend on the sharding.
    """
    return jax.random.key(seed, impl="rbg")


# Sampler settings under test and the allowance for their discretisation error on the mixture
# (mean, variance, low-mode mass), set about 2x above the bias measured with 65536 samples.
SAMPLER_SETTINGS = {
    "ddpm": dict(steps=250, allowance=(0.01, 0.02, 0.01)),
    # Deterministic DDIM at 50 steps loses ~3% of the variance (the Gaussian recursion shows the
    # same shrinkage, 0.25 -> 0.223); that is the method, not a bug.
    "ddim": dict(steps=50, allowance=(0.01, 0.07, 0.01)),
    "dpm++2m": dict(steps=20, allowance=(0.01, 0.04, 0.01)),
}


def analytic_eps(base, prediction="eps"):
    """Exact E[eps | x_t] for the per-channel mixtures, given to the sampler as `prediction`
    (eps, x_0 = (x_t - sigma eps) / alpha or v = alpha eps - sigma x_0); learned-sigma output
    with variance interpolation 0."""
    alphas_cumprod = jnp.asarray(base.alphas_cumprod, jnp.float32)
    weights, means, stds = (jnp.asarray(a, jnp.float32) for a in (WEIGHTS, MEANS, STDS))

    def model_fn(x, t, y):
        alpha_bar = alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
        alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
        # x_t | component k ~ N(alpha mu_k, alpha^2 s_k^2 + sigma^2); E[eps | x_t] = -sigma score.
        variance = alpha_bar * stds**2 + sigma**2  # (B, 1, 1, C, K)
        centered = x[..., None] - alpha * means
        log_resp = jnp.log(weights) - 0.5 * jnp.log(variance) - 0.5 * centered**2 / variance
        resp = jax.nn.softmax(log_resp, axis=-1)
        eps = sigma[..., 0] * jnp.sum(resp * centered / variance, axis=-1)
        # E[x_0 | x_t] directly from the components rather than from eps: at the noisiest steps
        # (x_t - sigma eps) / alpha would amplify float32 rounding by 1 / alpha = 156.
        x0 = jnp.sum(resp * (means + alpha * stds**2 * centered / variance), axis=-1)
        alpha, sigma = alpha[..., 0], sigma[..., 0]
        output = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
        return jnp.concatenate([output, jnp.zeros_like(output)], axis=-1)

    return model_fn


def gaussian_sampler_moments(sampler, chain, mean, var, eta=0.0):
    """Exact output mean and variance of `sampler` on `chain` for N(mean, var) data.

    With the exact denoiser x0_hat = mean + gain (x - alpha mean), gain = alpha var / (alpha^2 var
    + sigma^2), every update is x <- lin * x + const (+ independent noise for DDPM and for DDIM with
    eta > 0). DPM-Solver++
    also carries the previous x0_hat, so there x and x0_hat are tracked as affine functions
    (coef * z + const) of the initial noise z.
    """
    alpha_bar = chain.alphas_cumprod
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    out_mean, out_var = 0.0, 1.0  # x_T ~ N(0, 1)
    x, previous_x0, previous_h = np.array([1.0, 0.0]), None, None  # (coef of z, constant)
    for i in reversed(range(len(alpha_bar))):
        alpha, sigma = np.sqrt(alpha_bar[i]), np.sqrt(1 - alpha_bar[i])
        gain = alpha * var / (alpha**2 * var + sigma**2)
        offset = mean - gain * alpha * mean  # x0_hat = gain * x + offset
        if sampler == "ddpm":
            beta = 1 - alpha_bar[i] / alpha_bar_prev[i]
            coef_x0 = np.sqrt(alpha_bar_prev[i]) * beta / (1 - alpha_bar[i])
            coef_xt = np.sqrt(1 - beta) * (1 - alpha_bar_prev[i]) / (1 - alpha_bar[i])
            posterior_var = beta * (1 - alpha_bar_prev[i]) / (1 - alpha_bar[i])
            noise_var = np.sqrt(beta * posterior_var) if i > 0 else 0.0  # v = 0: geometric mean
            lin, const = coef_x0 * gain + coef_xt, coef_x0 * offset
            out_mean, out_var = lin * out_mean + const, lin**2 * out_var + noise_var
        elif sampler == "ddim":
            eps_lin, eps_const = (1 - alpha * gain) / sigma, -alpha * offset / sigma
            # DDIM's noise: eta times the std of q(x_{t-1} | x_t, x_0).
            noise_var = eta**2 * (
                (1 - alpha_bar_prev[i])
                / (1 - alpha_bar[i])
                * (1 - alpha_bar[i] / alpha_bar_prev[i])
            )
            keep = np.sqrt(alpha_bar_prev[i])
            direction = np.sqrt(1 - alpha_bar_prev[i] - noise_var)
            lin = keep * gain + direction * eps_lin
            const = keep * offset + direction * eps_const
            out_mean, out_var = lin * out_mean + const, lin**2 * out_var + noise_var
        else:
            x0 = np.array([gain * x[0], gain * x[1] + offset])
            if i == 0:
                x = x0  # last step: to alpha = 1, sigma = 0, first order
            else:
                alpha_next, sigma_next = np.sqrt(alpha_bar[i - 1]), np.sqrt(1 - alpha_bar[i - 1])
                h = np.log(alpha_next / sigma_next) - np.log(alpha / sigma)
                d = x0
                if previous_x0 is not None:
                    r = previous_h / h
                    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
                x = sigma_next / sigma * x + alpha_next * (1 - np.exp(-h)) * d
                previous_h = h
            previous_x0 = x0
            out_mean, out_var = x[1], x[0] ** 2
    return out_mean, out_var


@pytest.fixture(scope="module")
def base():
    return diffusion.create()


@pytest.fixture(
    scope="module",
    params=[(s, p) for p in ("eps", "v", "x0") for s in SAMPLER_SETTINGS],
    ids=lambda param: "-".join(param),
)
def analytic_run(request, base):
    sampler, prediction = request.param
    steps = SAMPLER_SETTINGS[sampler]["steps"]
    trained = diffusion.create(prediction=prediction)
    samples = diffusion.sample(
        analytic_eps(base, prediction),
        trained,
        ANALYTIC_SHAPE,
        key(0),
        sampler=sampler,
        steps=steps,
    )
    chex.assert_shape(samples, ANALYTIC_SHAPE)
    assert samples.dtype == jnp.float32
    chain = diffusion.respace(base, diffusion.spacing_for(sampler, steps))
    return sampler, chain, np.asarray(samples, np.float64)


def test_analytic_gaussian_matches_exact_sampler_moments(analytic_run):
    sampler, chain, samples = analytic_run
    x = samples[..., 0].ravel()
    mean, var = MEANS[0, 0], STDS[0, 0] ** 2
    expected_mean, expected_var = gaussian_sampler_moments(sampler, chain, mean, var)
    n = x.size
    se_mean, se_var = np.sqrt(expected_var / n), expected_var * np.sqrt(2 / (n - 1))
    assert abs(x.mean() - expected_mean) < NUM_SIGMAS * se_mean, (x.mean(), expected_mean)
    assert abs(x.var() - expected_var) < NUM_SIGMAS * se_var, (x.var(), expected_var)
    # The discrete samplers themselves are close to the data (DDIM-50 within 11%).
    assert abs(expected_mean - mean) < 0.01
    assert abs(expected_var - var) < (0.03 if sampler == "ddim" else 0.01)


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"),
    [
        # An evenly spaced time grid has an uneven log-SNR grid (step ratio r = 0.23 at the end),
        # which exercises DPM-Solver++'s variable-step coefficients; the default logSNR grid
        # has r close to 1 and would not notice an error in them.
        ("dpm++2m", "25", 0.0),
        ("ddim", 25, 1.0),
    ],
)
def test_analytic_gaussian_exact_moments_other_settings(base, sampler, steps, eta):
    samples = diffusion.sample(
        analytic_eps(base), base, (64, 16, 16, 2), key(1), sampler=sampler, steps=steps, eta=eta
    )
    x = np.asarray(samples[..., 0], np.float64).ravel()
    chain = diffusion.respace(base, diffusion.spacing_for(sampler, steps))
    expected_mean, expected_var = gaussian_sampler_moments(
        sampler, chain, MEANS[0, 0], STDS[0, 0] ** 2, eta
    )
    n = x.size
    se_mean, se_var = np.sqrt(expected_var / n), expected_var * np.sqrt(2 / (n - 1))
    assert abs(x.mean() - expected_mean) < NUM_SIGMAS * se_mean, (x.mean(), expected_mean)
    assert abs(x.var() - expected_var) < NUM_SIGMAS * se_var, (x.var(), expected_var)


def test_analytic_mixture_matches_data(analytic_run):
    sampler, _, samples = analytic_run
    x = samples[..., 1].ravel()
    n = x.size
    weights, means, stds = WEIGHTS[1], MEANS[1], STDS[1]
    true_mean = np.sum(weights * means)
    true_var = np.sum(weights * (stds**2 + means**2)) - true_mean**2
    true_low_mass = np.sum(weights * stats.norm.cdf(MODE_THRESHOLD, means, stds))
    mean_allowance, var_allowance, mass_allowance = SAMPLER_SETTINGS[sampler]["allowance"]

    se_mean = np.sqrt(true_var / n)
    se_var = np.std((x - x.mean()) ** 2) / np.sqrt(n)
    se_mass = np.sqrt(true_low_mass * (1 - true_low_mass) / n)
    assert abs(x.mean() - true_mean) < NUM_SIGMAS * se_mean + mean_allowance
    assert abs(x.var() - true_var) < NUM_SIGMAS * se_var + var_allowance, (x.var(), true_var)
    low_mass = np.mean(x < MODE_THRESHOLD)
    assert abs(low_mass - true_low_mass) < NUM_SIGMAS * se_mass + mass_allowance


# ---------------------------------------------------------------------------------------------
# Loop structure and timesteps


@pytest.mark.parametrize(
    ("sampler", "spec"), [("ddpm", "10"), ("ddim", "ddim10"), ("dpm++2m", "logsnr10")]
)
def test_model_is_traced_once_and_sees_original_timesteps(base, sampler, spec):
    traces, seen_t, seen_x = [], [], []

    def model_fn(x, t, y):
        traces.append(x.shape)
        jax.debug.callback(lambda t, x: (seen_t.append(np.asarray(t)), seen_x.append(x)), t, x)
        return jnp.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)

    out = diffusion.sample(model_fn, base, (2, 1, 1, 1), key(0), sampler=sampler, steps=10, eta=1.0)
    out = np.asarray(out)
    assert len(traces) == 1  # one traced body: the steps run inside lax.fori_loop
    kept = diffusion.space_timesteps(1000, spec, base.alphas_cumprod)
    np.testing.assert_array_equal(np.stack(seen_t), np.repeat(kept[::-1, None], 2, axis=1))
    # With eps = 0 the last step must return the noiseless x_0 estimate x / sqrt(alpha_bar_0).
    expected = np.asarray(seen_x[-1]) / np.sqrt(base.alphas_cumprod[kept[0]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance

NUM_CLASSES = 3
NULL_LABEL = NUM_CLASSES
CHANNELS = 4
LABEL_BIAS = np.random.default_rng(0).normal(size=(NUM_CLASSES + 1, CHANNELS))


SIGMA = np.sqrt(1.0 - diffusion.create().alphas_cumprod)


def toy_model(x, t, y, params=1.0):
    """Label-dependent eps, label-free v: (B, H, W, 4) -> (B, H, W, 8).

    eps = sigma_t (params x + bias_y) is the exact predictor for N(-bias_y, 1) data at params = 1,
    so samples stay bounded.
    """
    sigma = jnp.asarray(SIGMA, x.dtype)[t][:, None, None, None]
    eps = sigma * (params * x + jnp.asarray(LABEL_BIAS, x.dtype)[y][:, None, None, :])
    return jnp.concatenate([eps, 0.2 * jnp.tanh(x) - 0.1], -1)


def toy_model_label_variance(x, t, y):
    """As `toy_model` but v depends on y too, to see which half guidance takes it from."""
    return toy_model(x, t, y).at[..., CHANNELS:].add(0.1 * y[:, None, None, None])


def test_guided_model_fn_combines_the_two_halves():
    """Guidance arithmetic, halves and channels, against numpy."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 3, CHANNELS)), jnp.float32)
    t, y = jnp.array([5, 700]), jnp.array([0, 2])
    traced_batches = []

    def recording_model(x, t, y):
        traced_batches.append(x.shape[0])
        return toy_model_label_variance(x, t, y)

    @jax.jit
    def guided(scale, x, t, y):
        return diffusion.guided_model_fn(recording_model, scale, NULL_LABEL)(x, t, y)

    cond = np.asarray(toy_model_label_variance(x, t, y))
    uncond = np.asarray(toy_model_label_variance(x, t, jnp.full_like(y, NULL_LABEL)))
    for scale in (0.0, 1.0, 1.5, 4.0):
        out = np.asarray(guided(scale, x, t, y))
        expected_eps = uncond[..., :CHANNELS] + scale * (cond - uncond)[..., :CHANNELS]
        np.testing.assert_allclose(out[..., :CHANNELS], expected_eps, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[..., CHANNELS:], cond[..., CHANNELS:], rtol=1e-6, atol=1e-6)
    assert traced_batches == [4]  # one model call, on the doubled batch

    dit = diffusion.guided_model_fn(toy_model_label_variance, 1.5, NULL_LABEL, guidance_channels=3)
    dit = np.asarray(jax.jit(dit)(x, t, y))
    np.testing.assert_allclose(
        dit[..., :3], (uncond + 1.5 * (cond - uncond))[..., :3], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(dit[..., 3:], cond[..., 3:], rtol=1e-6, atol=1e-6)


SAMPLE_SHAPE = (8, 4, 4, CHANNELS)


@pytest.fixture(scope="module")
def toy_samplers(base):
    """Jitted DDPM samplers over the toy model: plain (labels traced), guided (scale traced)."""

    def plain(rng, labels):
        return diffusion.sample(toy_model, base, SAMPLE_SHAPE, rng, steps=10, labels=labels)

    def guided(rng, labels, scale):
        return diffusion.sample(
            toy_model,
            base,
            SAMPLE_SHAPE,
            rng,
            steps=10,
            labels=labels,
            cfg_scale=scale,
            null_label=NULL_LABEL,
        )

    return jax.jit(plain), jax.jit(guided)


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(toy_samplers):
    plain, guided = toy_samplers
    rng = key(3)
    labels = jnp.arange(8) % NUM_CLASSES
    conditional = np.asarray(plain(rng, labels))
    unconditional = np.asarray(plain(rng, jnp.full_like(labels, NULL_LABEL)))
    assert not np.allclose(conditional, unconditional, atol=1e-2)  # the labels matter
    np.testing.assert_allclose(np.asarray(guided(rng, labels, 1.0)), conditional, atol=1e-5)
    np.testing.assert_allclose(np.asarray(guided(rng, labels, 0.0)), unconditional, atol=1e-5)
    # Beyond 1 it extrapolates away from the unconditional samples.
    strong = np.asarray(guided(rng, labels, 3.0))
    assert np.abs(strong - unconditional).mean() > np.abs(conditional - unconditional).mean()


@pytest.fixture(scope="module")
def threefry_guided(base):
    """Unsharded guided DDPM sampler, shared by the determinism and sharding tests."""

    def guided(rng, labels, scale, sharding=None):
        return diffusion.sample(
            toy_model,
            base,
            SAMPLE_SHAPE,
            rng,
            steps=10,
            labels=labels,
            cfg_scale=scale,
            null_label=NULL_LABEL,
            sharding=sharding,
        )

    return guided, jax.jit(guided)


def test_sampling_is_deterministic_given_the_key(threefry_guided):
    _, guided = threefry_guided
    labels = jnp.arange(8) % NUM_CLASSES
    first = np.asarray(guided(jax.random.key(5), labels, 1.5))
    np.testing.assert_array_equal(first, np.asarray(guided(jax.random.key(5), labels, 1.5)))
    assert not np.allclose(first, np.asarray(guided(jax.random.key(6), labels, 1.5)))


def test_sharded_batch_matches_single_device(threefry_guided):
    guided_fn, guided = threefry_guided
    devices = np.array(jax.devices())
    assert devices.size == 8
    batch_sharding = NamedSharding(Mesh(devices, ("data",)), P("data"))
    rng = jax.random.key(7)
    labels = jnp.arange(8) % NUM_CLASSES

    sharded = jax.jit(lambda rng, labels, scale: guided_fn(rng, labels, scale, batch_sharding))
    out = sharded(rng, jax.device_put(labels, batch_sharding), 1.5)
    assert out.sharding.is_equivalent_to(batch_sharding, out.ndim)
    # Partitioned programs may fuse differently: equal up to float32 rounding.
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(guided(rng, labels, 1.5)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_sample_inside_jit_with_params_and_eta(base, sampler):
    """The documented pattern: params and scale are traced inputs of one jitted function."""

    @jax.jit
    def generate(params, rng, labels, scale):
        model_fn = lambda x, t, y: toy_model(x, t, y, params=params)
        return diffusion.sample(
            model_fn,
            base,
            SAMPLE_SHAPE,
            rng,
            sampler=sampler,
            steps=8,
            cfg_scale=scale,
            labels=labels,
            null_label=NULL_LABEL,
            guidance_channels=3,
            eta=1.0,
        )

    labels = jnp.arange(8) % NUM_CLASSES
    out = generate(1.0, key(0), labels, 1.5)
    chex.assert_shape(out, SAMPLE_SHAPE)
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    other_params = generate(0.5, key(0), labels, 1.5)
    assert not np.allclose(np.asarray(out), np.asarray(other_params))
    if sampler == "ddim":
        # eta = 1 makes DDIM stochastic: another key moves the samples even with the same x_T.
        assert not np.allclose(np.asarray(out), np.asarray(generate(1.0, key(1), labels, 1.5)))


def test_sample_rejects_bad_arguments(base):
    model_fn = lambda x, t, y: x
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(model_fn, base, (1, 1, 1, 1), jax.random.key(0), sampler="euler")
    with pytest.raises(ValueError, match="null_label"):
        diffusion.sample(model_fn, base, (1, 1, 1, 1), jax.random.key(0), cfg_scale=1.5)


# ---------------------------------------------------------------------------------------------
# Flow matching: Euler and Heun on the exact velocity field

FLOW_SETTINGS = {"euler": 50, "heun": 25}  # the same 50 model calls each


def analytic_velocity(x, t):
    """Exact E[eps - x_0 | x_t] of the per-channel mixtures for x_t = (1 - t) x_0 + t eps.

    x_t | component k ~ N((1 - t) mu_k, V_k) with V_k = (1 - t)^2 s_k^2 + t^2; within it
    E[eps | x_t] = t c / V_k and E[x_0 | x_t] = mu_k + (1 - t) s_k^2 c / V_k, c = x - (1 - t) mu_k.
    """
    weights, means, stds = (jnp.asarray(a, jnp.float32) for a in (WEIGHTS, MEANS, STDS))
    t = t.reshape(-1, 1, 1, 1, 1)
    variance = (1 - t) ** 2 * stds**2 + t**2  # (B, 1, 1, C, K)
    centered = x[..., None] - (1 - t) * means
    log_resp = jnp.log(weights) - 0.5 * jnp.log(variance) - 0.5 * centered**2 / variance
    resp = jax.nn.softmax(log_resp, axis=-1)
    velocity = t * centered / variance - (means + (1 - t) * stds**2 * centered / variance)
    return jnp.sum(resp * velocity, axis=-1)


def numpy_velocity(channel):
    """`analytic_velocity` of one channel in float64 numpy: x (P,) at scalar t -> (P,)."""
    weights, means, stds = WEIGHTS[channel], MEANS[channel], STDS[channel]

    def velocity(x, t):
        variance = (1 - t) ** 2 * stds**2 + t**2
        centered = x[:, None] - (1 - t) * means
        log_resp = np.log(weights) - 0.5 * np.log(variance) - 0.5 * centered**2 / variance
        resp = np.exp(log_resp - log_resp.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        target = t * centered / variance - (means + (1 - t) * stds**2 * centered / variance)
        return np.sum(resp * target, axis=1)

    return velocity


def numpy_ode_map(velocity, x, sampler, steps):
    """Euler or Heun from t = 1 to t = 0 in float64, written out on its own."""
    times = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in itertools.pairwise(times):
        h = t_next - t
        v = velocity(x, t)
        if sampler == "euler":
            x = x + h * v
        else:
            x = x + h * 0.5 * (v + velocity(x + h * v, t_next))
    return x


def discrete_flow_moments(channel, sampler, steps):
    """Mean, variance and low-mode mass of the discrete sampler's output for x_1 ~ N(0, 1).

    In one dimension the ODE sampler is a deterministic increasing map x_1 -> x_0, so these are
    integrals over the normal density of x_1, computed by the trapezoid rule on a fine grid; the
    mass below the threshold is Phi at the grid's preimage of it.
    """
    z = np.linspace(-9.0, 9.0, 20001)
    density = stats.norm.pdf(z)
    x = numpy_ode_map(numpy_velocity(channel), z, sampler, steps)
    assert np.all(np.diff(x) > 0)  # the map is increasing, so the preimage is well defined
    mean = np.trapezoid(density * x, z)
    variance = np.trapezoid(density * (x - mean) ** 2, z)
    fourth = np.trapezoid(density * (x - mean) ** 4, z)
    low_mass = stats.norm.cdf(np.interp(MODE_THRESHOLD, x, z))
    return {"mean": mean, "var": variance, "fourth": fourth, "low_mass": low_mass}


def flow_gaussian_moments(sampler, steps, mean, var):
    """Exact output mean and variance of Euler / Heun for N(mean, var) data and x_1 ~ N(0, 1).

    For Gaussian data the exact velocity is affine, v = a(t) x + b(t) with
    a = (t - (1 - t) var) / V, b = -a (1 - t) mean - mean, V = (1 - t)^2 var + t^2, so each step
    is x <- lin x + const.
    """

    def coefficients(t):
        a = (t - (1 - t) * var) / ((1 - t) ** 2 * var + t**2)
        return a, -a * (1 - t) * mean - mean

    out_mean, out_var = 0.0, 1.0
    times = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in itertools.pairwise(times):
        h = t_next - t
        a, b = coefficients(t)
        if sampler == "euler":
            lin, const = 1 + h * a, h * b
        else:
            a_next, b_next = coefficients(t_next)
            lin = 1 + 0.5 * h * (a + a_next * (1 + h * a))
            const = 0.5 * h * (b + b_next + a_next * h * b)
        out_mean, out_var = lin * out_mean + const, lin**2 * out_var
    return out_mean, out_var


@pytest.fixture(scope="module", params=list(FLOW_SETTINGS))
def flow_run(request):
    sampler = request.param
    steps = FLOW_SETTINGS[sampler]
    samples = diffusion.sample(
        lambda x, t, y: analytic_velocity(x, t),
        diffusion.create_flow(),
        ANALYTIC_SHAPE,
        key(0),
        sampler=sampler,
        steps=steps,
    )
    chex.assert_shape(samples, ANALYTIC_SHAPE)
    assert samples.dtype == jnp.float32
    return sampler, steps, np.asarray(samples, np.float64)


def test_flow_gaussian_matches_exact_sampler_moments(flow_run):
    sampler, steps, samples = flow_run
    x = samples[..., 0].ravel()
    mean, var = MEANS[0, 0], STDS[0, 0] ** 2
    expected_mean, expected_var = flow_gaussian_moments(sampler, steps, mean, var)
    n = x.size
    se_mean, se_var = np.sqrt(expected_var / n), expected_var * np.sqrt(2 / (n - 1))
    assert abs(x.mean() - expected_mean) < NUM_SIGMAS * se_mean, (x.mean(), expected_mean)
    assert abs(x.var() - expected_var) < NUM_SIGMAS * se_var, (x.var(), expected_var)
    # The recursion agrees with the quadrature of the same map (two derivations of one number).
    quadrature = discrete_flow_moments(0, sampler, steps)
    np.testing.assert_allclose(
        [quadrature["mean"], quadrature["var"]], [expected_mean, expected_var], rtol=1e-6
    )
    # x_1 is exactly N(0, 1), so the affine map keeps the mean exact; the variance is off by the
    # method's error: first order for Euler (6% at 50 steps), second order for Heun.
    assert abs(expected_mean - mean) < 1e-12
    assert abs(expected_var - var) < (0.02 if sampler == "euler" else 1e-3)


def test_flow_mixture_matches_data(flow_run):
    """Mean, variance and mode masses within sampling error of the discrete sampler's exact
    output, whose distance from the data is the discretisation error at this step count."""
    sampler, steps, samples = flow_run
    x = samples[..., 1].ravel()
    n = x.size
    weights, means, stds = WEIGHTS[1], MEANS[1], STDS[1]
    true_mean = np.sum(weights * means)
    true_var = np.sum(weights * (stds**2 + means**2)) - true_mean**2
    true_low_mass = np.sum(weights * stats.norm.cdf(MODE_THRESHOLD, means, stds))
    discrete = discrete_flow_moments(1, sampler, steps)

    se_mean = np.sqrt(discrete["var"] / n)
    se_var = np.sqrt((discrete["fourth"] - discrete["var"] ** 2) / n)
    se_mass = np.sqrt(discrete["low_mass"] * (1 - discrete["low_mass"]) / n)
    low_mass = np.mean(x < MODE_THRESHOLD)
    assert abs(x.mean() - discrete["mean"]) < NUM_SIGMAS * se_mean, (x.mean(), discrete["mean"])
    assert abs(x.var() - discrete["var"]) < NUM_SIGMAS * se_var, (x.var(), discrete["var"])
    assert abs(low_mass - discrete["low_mass"]) < NUM_SIGMAS * se_mass, (low_mass, discrete)

    # The data themselves, allowing the discretisation error computed for this step count.
    for got, truth, se, name in [
        (x.mean(), true_mean, se_mean, "mean"),
        (x.var(), true_var, se_var, "var"),
        (low_mass, true_low_mass, se_mass, "low_mass"),
    ]:
        allowance = abs(discrete[name] - truth)
        assert abs(got - truth) < NUM_SIGMAS * se + allowance, (name, got, truth)
        # Euler's error is first order (3% of the variance at 50 steps), Heun's second order.
        assert allowance < (0.03 if sampler == "euler" else 2e-3), (name, allowance)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_update_rules_on_a_linear_field(sampler):
    """v(x, t) = t x: the discrete maps are products over the grid, computed here in closed form.

    Euler multiplies by (1 - h t_k) per step, Heun by 1 - h (t_k + t_k+1) / 2 + h^2 t_k t_k+1 / 2,
    with h = 1 / N, t_k = 1 - k / N. The model is traced once and sees t as (B,) float32 at the
    grid points: t_k for Euler, then t_k and t_k+1 per step for Heun.
    """
    steps, traces, seen_t, seen_x = 4, [], [], []

    def model_fn(x, t, y):
        traces.append(x.shape)
        assert t.dtype == jnp.float32 and t.shape == (x.shape[0],)
        jax.debug.callback(lambda t, x: (seen_t.append(np.asarray(t)), seen_x.append(x)), t, x)
        return t[:, None, None, None] * x

    out = np.asarray(
        diffusion.sample(
            model_fn, diffusion.create_flow(), (2, 1, 1, 3), key(2), sampler=sampler, steps=steps
        ),
        np.float64,
    )
    assert len(traces) == 1
    times = np.linspace(1.0, 0.0, steps + 1)
    h = 1.0 / steps
    if sampler == "euler":
        factor = np.prod(1 - h * times[:-1])
        expected_t = times[:-1]
    else:
        factor = np.prod(1 - h * (times[:-1] + times[1:]) / 2 + h**2 * times[:-1] * times[1:] / 2)
        expected_t = np.stack([times[:-1], times[1:]], axis=1).ravel()
    np.testing.assert_allclose(
        np.stack(seen_t), np.repeat(expected_t[:, None], 2, axis=1), rtol=1e-7
    )
    x_1 = np.asarray(seen_x[0], np.float64)  # the first call sees the initial noise
    np.testing.assert_allclose(out, factor * x_1, rtol=1e-6)


def test_flow_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    bias = jnp.asarray(LABEL_BIAS, jnp.float32)

    def model_fn(x, t, y):  # label-dependent velocity of N(-bias_y, t^2)-like data
        return x + bias[y][:, None, None, :]

    flow = diffusion.create_flow()
    labels = jnp.arange(8) % NUM_CLASSES

    @jax.jit
    def draw(rng, labels, scale):
        return diffusion.sample(
            model_fn,
            flow,
            SAMPLE_SHAPE,
            rng,
            sampler="heun",
            steps=3,
            labels=labels,
            cfg_scale=scale,
            null_label=NULL_LABEL,
        )

    def plain(labels):
        return np.asarray(
            diffusion.sample(
                model_fn, flow, SAMPLE_SHAPE, key(3), sampler="heun", steps=3, labels=labels
            )
        )

    conditional, unconditional = plain(labels), plain(jnp.full_like(labels, NULL_LABEL))
    assert not np.allclose(conditional, unconditional, atol=1e-2)
    np.testing.assert_allclose(np.asarray(draw(key(3), labels, 1.0)), conditional, atol=1e-5)
    np.testing.assert_allclose(np.asarray(draw(key(3), labels, 0.0)), unconditional, atol=1e-5)


def test_flow_sample_rejects_bad_arguments():
    flow = diffusion.create_flow()
    model_fn = lambda x, t, y: x
    with pytest.raises(ValueError, match=r"'ddpm' samples the other process.*\('euler', 'heun'\)"):
        diffusion.sample(model_fn, flow, (1, 1, 1, 1), key(0), sampler="ddpm", steps=4)
    with pytest.raises(ValueError, match="number of ODE steps"):
        diffusion.sample(model_fn, flow, (1, 1, 1, 1), key(0), sampler="euler")
    with pytest.raises(ValueError, match="number of ODE steps"):
        diffusion.sample(model_fn, flow, (1, 1, 1, 1), key(0), sampler="euler", steps="ddim10")
    with pytest.raises(ValueError, match="clip_denoised"):
        diffusion.sample(
            model_fn, flow, (1, 1, 1, 1), key(0), sampler="heun", steps=4, clip_denoised=True
        )
    assert diffusion.samplers_for(flow) == ("euler", "heun")
    assert diffusion.samplers_for(diffusion.create()) == ("ddpm", "ddim", "dpm++2m")
