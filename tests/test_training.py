"""System-level checks of the training system on the smoke config (tiny DiffuSSM, real digits)."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import quickstart
from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax import inference, parallel, sampling, training
from diffussm_jax.training import loop, train_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**fields):
    config = quickstart.get_config("smoke")
    with config.unlocked():
        config.data.data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
        config.update_from_flattened_dict(fields)
    return config


SIDE = quickstart.get_config("smoke").data.image_size  # what the smoke model sees


def fixed_batch(size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.uniform(-1, 1, (size, SIDE, SIDE, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
    }


def run_steps(config, mesh, batches):
    model = train_state.build_model(config)
    diffusion = training.create_diffusion(config)
    tx = train_state.create_optimizer(config)
    state, shardings = train_state.create_train_state(config, model, tx, mesh)
    step = train_step.make_train_step(config, model, diffusion, mesh, shardings)
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_sharded_step_equals_single_device_step():
    config = smoke_config(**{"mesh.fsdp": 4, "mesh.fsdp_min_size": 0})
    batches = [fixed_batch(seed=i) for i in range(2)]
    single, single_metrics = run_steps(
        config, parallel.create_mesh(1, 1, jax.devices()[:1]), batches
    )
    mesh = parallel.create_mesh(2, 4)
    sharded, sharded_metrics = run_steps(config, mesh, batches)

    # FSDP really shards: the largest kernels are split over the 4 'fsdp' devices.
    w2 = sharded.params["blocks"]["W2"]["kernel"]
    assert w2.sharding.shard_shape(w2.shape)[1] == w2.shape[1] // 4
    assert parallel.bytes_per_device(sharded.params) < parallel.bytes_per_device(single.params)

    # Same math, different reduction order across devices: float32 roundoff only.
    for a, b in zip(single_metrics, sharded_metrics, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_loss_decreases_on_embedded_digits():
    """A fixed-noise evaluation loss on real digits drops over 40 steps of training."""
    config = smoke_config(num_train_steps=40, sample_every_steps=0)
    config.unlock()
    config.learning_rate = 1e-3
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    iterator = loop.create_data_iterator(config)
    batches = [loop.global_batch(next(iterator), config, mesh) for _ in range(40)]
    model = train_state.build_model(config)
    diffusion = training.create_diffusion(config)
    eval_batch = batches[0]
    t = jnp.arange(16, dtype=jnp.int32) * 62
    noise = jax.random.normal(jax.random.key(7), eval_batch["image"].shape)

    @jax.jit
    def eval_loss(params):
        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y)

        terms = diffusion_lib.training_losses(
            model_fn, diffusion, eval_batch["image"], t, noise, eval_batch["label"]
        )
        return terms["mse"].mean()

    tx = train_state.create_optimizer(config)
    state, _ = train_state.create_train_state(config, model, tx, mesh)
    before = float(eval_loss(state.params))
    state, _ = run_steps(config, mesh, batches)
    after = float(eval_loss(state.params))
    assert before == pytest.approx(1.0, abs=0.1)  # zero output at init: MSE of unit noise
    assert after < 0.8 * before, (before, after)


def test_resume_matches_uninterrupted_run(tmp_path):
    """10 steps straight == 6 steps, restart from the checkpoint, 4 more: bitwise."""
    config = smoke_config(num_train_steps=10, checkpoint_every_steps=3, sample_every_steps=0)
    straight = training.train(config, str(tmp_path / "straight"))

    resumed_dir = str(tmp_path / "resumed")
    with config.unlocked():
        config.num_train_steps = 6
    training.train(config, resumed_dir)
    with config.unlocked():
        config.num_train_steps = 10
    resumed = training.train(config, resumed_dir)

    assert int(resumed.step) == 10
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_equals_one_big_batch():
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    batches = [fixed_batch(seed=i) for i in range(3)]
    whole, whole_metrics = run_steps(smoke_config(), mesh, batches)
    accumulated, accumulated_metrics = run_steps(smoke_config(grad_accum_steps=4), mesh, batches)
    for a, b in zip(whole_metrics, accumulated_metrics, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_array_equal(a["bucket_count"], b["bucket_count"])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(accumulated), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_pixel_samples_clip_their_x0_estimates_and_latents_do_not():
    config = smoke_config()
    assert training.clip_denoised_for(config)  # uint8 digits in [-1, 1]
    latent = smoke_config(**{"data.latent_scale": 0.18215})
    assert not training.clip_denoised_for(latent)
    forced = smoke_config(**{"data.latent_scale": 0.18215, "sampling.clip_denoised": True})
    assert training.clip_denoised_for(forced)

    # An untrained eps model predicts eps = 0, so its x_0 estimate x_t / sqrt(alpha_bar) is far
    # out of the data range: only the clip keeps a deterministic sampler's output inside it.
    # (The quickstart predicts v, whose x_0 estimate is not amplified, hence eps here.)
    config = smoke_config(**{"diffusion.prediction": "eps"})
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    model = train_state.build_model(config)
    diffusion = training.create_diffusion(config)
    state, _ = train_state.create_train_state(
        config, model, train_state.create_optimizer(config), mesh
    )
    labels = np.arange(4, dtype=np.int32)
    peaks = {}
    for clip in (True, False):
        sample_fn = sampling.make_sample_fn(
            model, diffusion, mesh, sampler="dpm++2m", steps=5, cfg_scale=2.0, clip_denoised=clip
        )
        samples = sampling.draw(sample_fn, state.ema_params, jax.random.key(0), labels, mesh)
        peaks[clip] = float(np.abs(samples).max())
    assert peaks[True] <= 1.0 and peaks[False] > 10.0, peaks


def flow_config(**fields):
    """The smoke config as a flow model: velocity prediction, Heun sample grids."""
    flow = {"diffusion.process": "flow", "diffusion.prediction": "eps", "sampling.sampler": "heun"}
    return smoke_config(**{**flow, **fields})


def test_process_settings_are_checked_and_errors_name_the_fix():
    flow = training.create_diffusion(
        flow_config(**{"diffusion.t_sampling": "logit_normal", "diffusion.logit_std": 0.5})
    )
    assert flow == diffusion_lib.create_flow("logit_normal", 0.0, 0.5)
    gaussian = training.create_diffusion(
        smoke_config(**{"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr"})
    )
    assert (gaussian.prediction, gaussian.loss_weighting, gaussian.min_snr_gamma) == (
        "v",
        "min_snr",
        5.0,
    )
    # The flow network outputs C channels and trains on the velocity MSE only.
    wrong = smoke_config(
        **{"diffusion.process": "flow", "model.learn_sigma": True, "diffusion.loss": "hybrid"}
    )
    with pytest.raises(ValueError, match=r"learn_sigma=False.*diffusion\.loss=mse"):
        training.create_diffusion(wrong)
    with pytest.raises(ValueError, match="prediction=eps"):
        training.create_diffusion(flow_config(**{"diffusion.prediction": "v"}))
    with pytest.raises(ValueError, match="process=flow"):
        training.create_diffusion(smoke_config(**{"diffusion.t_sampling": "logit_normal"}))
    with pytest.raises(ValueError, match=r"choose one of \('gaussian', 'flow'\)"):
        training.create_diffusion(smoke_config(**{"diffusion.process": "ode"}))
    # The quickstart's dpm++2m cannot sample a flow model: caught before training starts.
    dpm = flow_config(**{"sampling.sampler": "dpm++2m"})
    with pytest.raises(ValueError, match=r"sampling\.sampler to one of \('euler', 'heun'\)"):
        training.experiment.check_samplers(dpm, training.create_diffusion(dpm))
    heun_eval = smoke_config(**{"eval.sampler": "heun"})
    with pytest.raises(ValueError, match=r"eval\.sampler='heun'.*'ddpm', 'ddim', 'dpm\+\+2m'"):
        training.experiment.check_samplers(heun_eval, training.create_diffusion(heun_eval))
    # No x_0 clip for flow (the pixel default would clip), and an explicit one is refused.
    assert not training.clip_denoised_for(flow_config())
    with pytest.raises(ValueError, match="clip_denoised"):
        training.clip_denoised_for(flow_config(**{"sampling.clip_denoised": True}))
    assert train_state.build_model(flow_config()).timestep_scale == 1000.0
    assert train_state.build_model(smoke_config()).timestep_scale == 1.0


def test_runs_saved_before_the_process_fields_stay_gaussian():
    saved = json.loads(smoke_config().to_json())
    for name in ("process", "prediction", "loss_weighting", "min_snr_gamma", "t_sampling"):
        del saved["diffusion"][name]
    old = train_state.upgrade_saved_config(ml_collections.ConfigDict(saved))
    diffusion = training.create_diffusion(old)
    assert isinstance(diffusion, diffusion_lib.Diffusion) and diffusion.prediction == "eps"
    assert train_state.build_model(old).timestep_scale == 1.0


def test_flow_train_step_and_sample_grid():
    config = flow_config()
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    batches = [fixed_batch(seed=i) for i in range(2)]
    state, history = run_steps(config, mesh, batches)
    first = history[0]
    # The zero-initialised output layer predicts v = 0 at the first step, so the loss is the
    # mean of (eps - x_0)^2 = 1 + mean(x_0^2) (the Gaussian eps loss would be 1, the x_0 loss
    # mean(x_0^2)); 4096 values give a standard error of about 0.03.
    expected = 1.0 + float(np.mean(np.square(batches[0]["image"])))
    assert abs(first["loss"] - expected) < 0.15, (first["loss"], expected)
    for metrics in history:
        assert metrics["nonfinite"] == 0 and metrics["vb"] == 0.0
        assert metrics["mse"] == pytest.approx(metrics["loss"], rel=1e-6)
        assert metrics["bucket_count"].sum() == 16  # every flow time falls in a quartile

    model = train_state.build_model(config)
    diffusion = training.create_diffusion(config)
    with pytest.raises(ValueError, match=r"\('euler', 'heun'\)"):
        sampling.make_sample_fn(model, diffusion, mesh, sampler="ddpm", steps=2, cfg_scale=2.0)
    sample_fn = sampling.make_sample_fn(
        model,
        diffusion,
        mesh,
        sampler="heun",
        steps=2,
        cfg_scale=2.0,
        clip_denoised=training.clip_denoised_for(config),
    )
    samples = sampling.draw(sample_fn, state.ema_params, jax.random.key(0), np.arange(3), mesh)
    assert samples.shape == (3, SIDE, SIDE, 1) and np.all(np.isfinite(samples))


def test_ema_update():
    ema = {"w": jnp.array([1.0, 2.0])}
    params = {"w": jnp.array([3.0, 6.0])}
    np.testing.assert_allclose(train_step.ema_update(ema, params, 0.9)["w"], [1.2, 2.4])
    np.testing.assert_allclose(train_step.ema_update(ema, params, 0.0)["w"], [3.0, 6.0])


def test_ema_warmup_forgets_the_initial_parameters():
    steps = jnp.arange(4000)
    fixed = jax.vmap(lambda s: train_step.ema_decay_at(s, 0.995, False))(steps)
    warm = jax.vmap(lambda s: train_step.ema_decay_at(s, 0.995, True))(steps)
    np.testing.assert_array_equal(fixed, np.float32(0.995))
    np.testing.assert_allclose(warm[:3], [1 / 10, 2 / 11, 3 / 12], rtol=1e-6)
    assert warm.max() == np.float32(0.995) and int(np.argmax(warm >= 0.995)) == 1790
    # Weight left on the initial parameters after n updates: prod of the decays.
    at_300 = {
        name: float(np.prod(d[:300].astype(np.float64)))
        for name, d in (("fixed", fixed), ("warm", warm))
    }
    assert at_300["fixed"] == pytest.approx(0.995**300, rel=1e-4)  # 22%
    assert at_300["warm"] < 1e-15  # the first update already keeps only 10%


def test_nonfinite_batch_skips_update():
    config = smoke_config()
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    good = fixed_batch()
    bad = {**good, "image": good["image"].at[0, 0, 0, 0].set(jnp.nan)}
    state, history = run_steps(config, mesh, [good, bad])
    reference, _ = run_steps(config, mesh, [good])
    assert history[1]["nonfinite"] == 1 and history[0]["nonfinite"] == 0
    assert history[1]["overflowed"] == 0
    assert int(state.step) == 2
    # The skip is exact, moments, step counters and EMA included (the update runs in place with
    # Adam's betas at 1, zero gradients and a zero update).
    kept = (state.params, state.ema_params, state.opt_state)
    expected = (reference.params, reference.ema_params, reference.opt_state)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_update_that_overflows_from_finite_inputs_is_flagged_as_applied():
    """In place, an update that overflows although loss, gradients and learning rates were
    finite cannot be undone: the step says so, and the trainer stops on it."""
    config = smoke_config()
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    model = train_state.build_model(config)
    tx = optax.chain(optax.scale(3e38), optax.scale(10.0))  # finite factors, infinite updates
    state, _ = train_state.create_train_state(config, model, tx, mesh)
    _, metrics = train_step.train_step(
        state,
        fixed_batch(),
        model=model,
        diffusion=training.create_diffusion(config),
        optimizer=train_step.SkippableOptimizer(lambda keep: tx, {"default": 1e-4}),
        ema_decay=0.9,
    )
    metrics = jax.device_get(metrics)
    assert metrics["overflowed"] == 1 and metrics["nonfinite"] == 1
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert "applied in place" in train_step.nonfinite_quantity(metrics)
    assert "training stops whatever config.nonfinite says" in str(
        loop.overflow_error(7, "step 5 in /x")
    )


def test_ssm_dynamics_have_their_own_optimizer_group():
    config = smoke_config()
    with config.unlocked():
        config.ssm_learning_rate = 0.0
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    model = train_state.build_model(config)
    tx = train_state.create_optimizer(config)
    start, _ = train_state.create_train_state(config, model, tx, mesh)
    start = jax.device_get(start)
    # Three steps: at init the zero final layer, then the zero adaLN gates, block every
    # gradient into the blocks' inner weights.
    state, _ = run_steps(config, mesh, [fixed_batch(seed=i) for i in range(3)])
    ssm_before = start.params["blocks"]["ssm"]["forward"]
    ssm_after = jax.device_get(state.params["blocks"]["ssm"]["forward"])
    for name in ("log_dt", "log_a_real", "a_imag"):
        np.testing.assert_array_equal(ssm_before[name], ssm_after[name])
    assert not np.array_equal(ssm_before["c"], ssm_after["c"])  # C is an ordinary weight


def test_logged_learning_rate_is_the_one_the_optimizer_applied():
    config = smoke_config(warmup_steps=4, learning_rate=0.01)
    tx = train_state.create_optimizer(config)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    for update_index in range(6):
        # Constant gradients: Adam's bias-corrected step is lr * sign(gradient), up to float32
        # rounding of the bias corrections.
        updates, opt_state = tx.update({"w": jnp.full(3, 0.5)}, opt_state, params)
        logged = loop.learning_rates_logged(config, update_index + 1)  # at the step after
        assert logged == {"learning_rate": pytest.approx(-float(updates["w"][0]), rel=1e-4)}
    halfway = train_state.learning_rate_at(config, 2)
    assert halfway == {"default": pytest.approx(0.005), "ssm": pytest.approx(0.005)}
    with config.unlocked():
        config.ssm_learning_rate = 0.001
    assert loop.learning_rates_logged(config, 100) == {
        "learning_rate": pytest.approx(0.01),
        "ssm_learning_rate": pytest.approx(0.001),
    }


def test_batch_and_mesh_errors_name_both_numbers():
    mesh = parallel.create_mesh(2, 4)
    with pytest.raises(ValueError, match="global_batch_size 12 is not divisible by the 8"):
        parallel.check_global_batch(12, mesh)
    with pytest.raises(ValueError, match="3 x fsdp=2"):
        parallel.create_mesh(3, 2)
    # Resuming a checkpointed run on a device count its batch does not divide: say both ways out.
    config = smoke_config(global_batch_size=12)

    class Checkpoints:
        def all_steps(self):
            return [4, 8]

    with pytest.raises(ValueError, match=r"not divisible by the 8.*steps \[4, 8\].*divides 12"):
        loop.check_batch_fits(config, mesh, Checkpoints())


def test_bad_labels_and_shapes_are_explained():
    config = smoke_config()
    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    batch = {k: np.asarray(v) for k, v in fixed_batch().items()}
    with pytest.raises(ValueError, match=r"labels out of range \[0, 10\)"):
        loop.global_batch({**batch, "label": batch["label"] + 10}, config, mesh)
    with pytest.raises(ValueError, match="image_size"):
        loop.global_batch({**batch, "image": batch["image"][:, : SIDE - 2]}, config, mesh)


def test_unwritable_workdir_is_explained(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        loop.check_workdir(str(blocked / "run"))


@functools.lru_cache
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return env


def launch(*args, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_milestone_checkpoints_survive_rotation_and_can_be_sampled(tmp_path):
    """keep_every_steps: milestones outlive the rolling window (and are saved off the
    checkpoint cadence); launch.sample --step reads one; a missing step ends with status 2."""
    workdir = str(tmp_path / "run")
    config = smoke_config(
        num_train_steps=10,
        checkpoint_every_steps=3,
        keep_checkpoints=1,
        keep_every_steps=5,
        sample_every_steps=0,
    )
    final = training.train(config, workdir)
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    steps = sorted(int(name) for name in names if name.isdigit())
    assert steps == [5, 10]  # 3, 6 and 9 rotated out; 5 is a milestone, 10 the newest

    mesh = parallel.create_mesh(1, 1, jax.devices()[:1])
    experiment = training.setup(config, mesh, for_training=False)
    milestone, step = inference.restore_ema_params(experiment, workdir, checkpoint_step=5)
    newest, newest_step = inference.restore_ema_params(experiment, workdir)
    assert (step, newest_step) == (5, 10)
    for a, b in zip(jax.tree.leaves(newest), jax.tree.leaves(final.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(milestone), jax.tree.leaves(newest), strict=True)
    )

    output = tmp_path / "milestone.npz"
    args = [f"--workdir={workdir}", "--num_samples=2", f"--output={output}", "--steps=2"]
    result = launch("launch.sample", *args, "--step=5", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.is_file()
    result = launch("launch.sample", *args, "--step=3", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no checkpoint at step 3" in result.stderr and "[5, 10]" in result.stderr
    assert "Traceback" not in result.stderr


def test_launchers_train_then_sample(tmp_path):
    workdir = tmp_path / "run"
    data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
    extra = [f"--config.data.data_dir={data_dir}"] if data_dir else []
    env = {**_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # classifier trained here
    # In-training FID on the digits (classifier features) at the last step.
    fid = ["--config.eval.fid_every_steps=20", "--config.eval.fid_num_samples=16"]
    result = launch(
        "launch.train",
        "--config=configs/quickstart.py:smoke",
        f"--workdir={workdir}",
        *extra,
        *fid,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "checkpoints" / "20").is_dir()
    assert (workdir / "samples" / "step_0000020.png").is_file()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_t_q1" in r] == [10, 20]
    (scores,) = [r for r in records if "eval/digits_accuracy" in r]
    assert scores["step"] == 20 and 0 <= scores["eval/digits_accuracy"] <= 1
    assert np.isfinite(scores["eval/digits_frechet_distance"])
    assert list((workdir / "tb").iterdir())
    assert [r["learning_rate"] for r in records if "loss" in r] == [0.002, 0.002]
    (grid,) = [r for r in records if "eval/grid_digits_accuracy" in r]
    assert grid["step"] == 20 and 0 <= grid["eval/grid_digits_accuracy"] <= 1
    assert (workdir / "plots" / "training.png").is_file()
    # The console: this project's lines only (no orbax internals, no config dump), a progress
    # line per logging window here, and a closing summary with the grid's digit accuracy.
    console = result.stderr.splitlines()
    assert len(console) <= 20, result.stderr
    assert "CheckpointManager" not in result.stderr and "adam_b1" not in result.stderr
    assert any(" step 20/20 (100%)  loss " in line for line in console)
    assert any("Done: step 20 of 20" in line for line in console)
    assert any(line.endswith("plots/training.png") for line in console)
    accuracy = f"{grid['eval/grid_digits_accuracy']:.1%} of 10 classified as the requested digit"
    assert console[-1].endswith(f"samples/step_0000020.png: {accuracy}")
    plotted = launch("launch.plot", f"--workdir={workdir}", timeout=120)
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    assert plotted.stdout.strip() == str(workdir / "plots" / "training.png")

    output = tmp_path / "samples.npz"
    result = launch(
        "launch.sample",
        f"--workdir={workdir}",
        "--num_samples=6",
        f"--output={output}",
        "--steps=3",
        "--labels=3,7",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(output, allow_pickle=False) as f:
        assert f["arr_0"].shape == (6, SIDE, SIDE, 1) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], [3, 7, 3, 7, 3, 7])
    assert output.with_suffix(".png").is_file()
    assert "classified as the requested digit" in result.stdout.splitlines()[-1]
    assert "Given directory is read only" not in result.stderr

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.evaluate",
            f"--workdir={workdir}",
            "--num_samples=20",
            "--steps=3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (scores_file,) = (workdir / "eval").glob("*.json")
    scores = json.loads(scores_file.read_text())
    assert scores["num_samples"] == 20 and 0.0 <= scores["accuracy"] <= 1.0
    assert scores["classifier_test_accuracy"] > 0.95 and scores["frechet_distance"] > 0
    assert os.path.isfile(scores["samples"]) and scores["steps"] == 3
    assert json.loads(result.stdout) == scores  # stdout: the result as JSON, for `> file`
    summary = [line for line in result.stderr.splitlines() if "classified as the requested" in line]
    assert summary and f"{scores['accuracy']:.1%} classified" in summary[0]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    data_dir = os.environ.get("DIFFUSSM_TEST_DATA_DIR")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/quickstart.py:smoke",
            "--config.num_train_steps=100000",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=100000",
            *([f"--config.data.data_dir={data_dir}"] if data_dir else []),
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics_file = workdir / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM received" in stderr
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2


def test_unknown_config_field_is_rejected(tmp_path):
    result = launch(
        "launch.train",
        "--config=configs/quickstart.py:smoke",
        "--config.global_batchsize=8",
        f"--workdir={tmp_path}",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "global_batchsize" in result.stderr and "global_batch_size" in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.model.dept=3"], r"model\.dept=3: .*no field 'dept'.*\"depth\""),
        (["--config.model_overrides.depth=2"], r"overrides\.depth=2: .*now 'model\.depth'"),
        (["--config.learn_sigma=False"], r"learn_sigma=False: .*now 'model\.learn_sigma'"),
        (["--config.model=DiT-S/2"], r"model=DiT-S/2: .*now 'model_name'"),
        (["--config.model.num_heads=4"], r"DiffuSSM-S .*no field.*'num_heads'.*valid fields"),
        (["--config.global_batch_size=abc"], r"global_batch_size=abc.*invalid literal"),
        (["--wrkdir=/tmp/x"], r"Unknown command line flag 'wrkdir'.*workdir"),
        (["--config.dtype=bfloat16"], r"dtype=bfloat16: .*now 'precision.compute'"),
        (["--config.precision.ssm=bfloat16"], r"ssm='bfloat16'.*FFT.*float32 or float64"),
    ],
)
def test_command_line_mistakes_end_with_one_message_and_status_2(tmp_path, args, expected):
    """Not a traceback through absl and ml_collections (a config typo used to print 55 lines)."""
    result = launch(
        "launch.train",
        "--config=configs/quickstart.py:smoke",
        f"--workdir={tmp_path}",
        *args,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert re.search(expected, result.stderr), result.stderr
