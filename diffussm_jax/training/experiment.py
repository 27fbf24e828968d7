"""One experiment builder: what a config describes, built once for every entry point.

    experiment = setup(config)                    # model, diffusion, optimizer, mesh, shardings
    state = experiment.init_state()               # sharded at birth; or restore into
    step_fn = experiment.train_step()             #   experiment.abstract_state
    sample_fn = experiment.sample_fn()            # config.sampling's sampler, EMA params in

The trainer (`training.loop`), the inference restore (`inference.restore`),
scripts/pod_memory.py and scripts/digits_sweep.py all start here. The config's readings that
more than one of them needs (the diffusion process, whether samplers clip, the VAE decoder of a
latent dataset, the sampler settings) live here too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from diffussm_jax import diffusion as diffusion_lib
from diffussm_jax import parallel, sampling
from diffussm_jax import vae as vae_lib
from diffussm_jax.training import train_state, train_step

PROCESSES = ("gaussian", "flow")


def create_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.Process:
    """The process `config.diffusion` describes: Gaussian (`diffusion.create`) or flow.

    Raises:
      ValueError: an unknown process, or settings that do not fit it, listing every override
        that would fix the config.
    """
    settings = config.diffusion
    process = settings.process
    if process not in PROCESSES:
        raise ValueError(
            f"config.diffusion.process={process!r}; choose one of {PROCESSES} (docs/objectives.md)."
        )
    if process == "flow":
        # The flow network predicts the velocity with C output channels: nothing of the
        # Gaussian process's variance, prediction or weighting options applies.
        fixes = []
        if config.model.learn_sigma:
            fixes.append("--config.model.learn_sigma=False (there is no variance to learn)")
        if config.diffusion.loss != "mse":
            fixes.append(f"--config.diffusion.loss=mse (not {config.diffusion.loss!r})")
        if settings.prediction != "eps":
            fixes.append("--config.diffusion.prediction=eps (a flow network predicts eps - x_0)")
        if settings.loss_weighting != "none":
            fixes.append("--config.diffusion.loss_weighting=none (min-SNR is Gaussian only)")
        if fixes:
            raise ValueError(
                "config.diffusion.process='flow' (the network predicts the velocity eps - x_0) "
                f"needs {'; '.join(fixes)}."
            )
        return diffusion_lib.create_flow(
            t_sampling=settings.t_sampling,
            logit_mean=settings.logit_mean,
            logit_std=settings.logit_std,
        )
    if settings.t_sampling != "uniform":
        raise ValueError(
            f"config.diffusion.t_sampling={settings.t_sampling!r} draws flow times; the "
            "Gaussian process draws its integer steps uniformly. Set "
            "--config.diffusion.process=flow, or --config.diffusion.t_sampling=uniform."
        )
    return diffusion_lib.create(
        num_timesteps=config.diffusion.num_timesteps,
        schedule=config.diffusion.schedule,
        learn_sigma=config.model.learn_sigma,
        loss=config.diffusion.loss,
        prediction=settings.prediction,
        loss_weighting=settings.loss_weighting,
        min_snr_gamma=settings.min_snr_gamma,
    )


def check_samplers(config: ml_collections.ConfigDict, diffusion: diffusion_lib.Process) -> None:
    """Fails at start, not at the first sample grid, when a configured sampler cannot sample
    `diffusion` (`config.sampling.sampler`, and `config.eval.sampler` when set).
    """
    fields = {"sampling.sampler": config.sampling.sampler}
    if config.eval.sampler:
        fields["eval.sampler"] = config.eval.sampler
    valid = diffusion_lib.samplers_for(diffusion)
    for field, sampler in fields.items():
        if sampler not in valid:
            raise ValueError(
                f"config.{field}={sampler!r} cannot sample config.diffusion.process="
                f"{config.diffusion.process!r}; set --config.{field} to one of "
                f"{valid}."
            )


def sampling_settings(config: ml_collections.ConfigDict, **overrides) -> dict[str, Any]:
    """`config.sampling`'s sampler, steps and cfg_scale, each replaced by a non-None keyword of
    `overrides` (where in-training evaluation or a launcher's flag differs); other non-None
    keywords (e.g. guidance_channels) are passed through. The one place these defaults are
    filled in."""
    settings = dict(
        sampler=config.sampling.sampler,
        steps=config.sampling.steps,
        cfg_scale=config.sampling.cfg_scale,
    )
    settings.update({name: value for name, value in overrides.items() if value is not None})
    return settings


def clip_denoised_for(config: ml_collections.ConfigDict) -> bool:
    """Whether samplers clip their x_0 estimates to [-1, 1]: `config.sampling.clip_denoised`.

    Gaussian process: unset, pixel-space data (uint8 images mapped to [-1, 1]) clips and latents
    do not. Without the clip, a pixel model's early eps errors, multiplied by up to
    1/sqrt(alpha_bar) = 156 at t = T-1, push deterministic samplers far outside the data range
    (docs/quickstart.md).

    Flow process: never. Its samplers step with the velocity, and its x_0 estimate x - t v carries
    no such amplification; unset gives False, and True is an error rather than ignored.
    """
    clip = config.sampling.get("clip_denoised")
    if config.diffusion.process == "flow":
        if clip:
            raise ValueError(
                "config.sampling.clip_denoised=True: the flow samplers do not clip x_0; unset it "
                "(or set it to False) for config.diffusion.process='flow'."
            )
        return False
    return (not config.data.latent_scale) if clip is None else bool(clip)


def latent_decoder(
    config: ml_collections.ConfigDict, vae_path: str | None = None
) -> vae_lib.LatentDecoder | None:
    """The decoder for a latent-space config (None in pixel space: `data.latent_scale` unset).

    `vae_path` overrides `config.vae.path`.

    Raises:
      ValueError: a latent config without a VAE path, or a VAE whose latent channels differ.
      vae.VAEWeightsNotFoundError / vae.VAEWeightsError: missing or unusable weights.
    """
    if not config.data.latent_scale:
        return None
    vae_path = vae_path or config.vae.path
    if not vae_path:
        raise ValueError(
            f"Dataset {config.data.name!r} holds VAE latents (data.latent_scale="
            f"{config.data.latent_scale}), so images need the VAE decoder: set "
            "--config.vae.path=/path/to/sd-vae-ft-ema (launch.sample: --vae=...); "
            "docs/latents.md says where to get it. To train without sample grids, set "
            "--config.sample_every_steps=0."
        )
    model, params = vae_lib.load(os.path.expanduser(vae_path))
    if model.config.latent_channels != config.data.channels:
        raise ValueError(
            f"The VAE in {vae_path} has {model.config.latent_channels} latent channels, the "
            f"config's data.channels is {config.data.channels}: is it the VAE that extracted "
            f"{config.data.name!r}?"
        )
    return vae_lib.LatentDecoder(model, params, config.data.latent_scale)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a config builds: the model, its diffusion process, the optimizer, the mesh, and the
    train state's abstract form and shardings (nothing materialised yet)."""

    config: ml_collections.ConfigDict
    model: nn.Module
    diffusion: diffusion_lib.Process
    mesh: jax.sharding.Mesh
    # For training only (None for inference, which needs neither an optimizer nor its state):
    optimizer: optax.GradientTransformation | None
    abstract_state: train_state.TrainState | None  # ShapeDtypeStructs carrying their shardings
    state_shardings: Any  # a NamedSharding per leaf of the state

    def abstract_params(self) -> Any:
        """ShapeDtypeStructs (with shardings) of the parameters alone, e.g. to restore EMA."""
        return train_state.abstract_params(self.config, self.model, self.mesh)

    def init_state(self) -> train_state.TrainState:
        """A freshly initialised state, created sharded (never materialised whole)."""
        state, _ = train_state.create_train_state(
            self.config, self.model, self.optimizer, self.mesh
        )
        return state

    def train_step(self):
        """The jitted `(state, batch) -> (state, metrics)` (`train_step.make_train_step`)."""
        return train_step.make_train_step(
            self.config, self.model, self.diffusion, self.mesh, self.state_shardings
        )

    def sample_fn(self, decoder: vae_lib.LatentDecoder | None = None, **overrides):
        """`sampling.make_sample_fn` with `config.sampling`'s sampler, steps and guidance, each
        replaced by a non-None keyword of `overrides` (sampler, steps, cfg_scale,
        guidance_channels)."""
        return sampling.make_sample_fn(
            self.model,
            self.diffusion,
            self.mesh,
            clip_denoised=clip_denoised_for(self.config),
            decoder=decoder,
            **sampling_settings(self.config, **overrides),
        )


def setup(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None = None,
    model: nn.Module | None = None,
    *,
    for_training: bool = True,
) -> Experiment:
    """Builds `config`'s experiment on `mesh` (unset: the config's mesh over all devices).

    `model` replaces the config's model (e.g. a scripted variant). `for_training=False` builds
    what inference needs: no optimizer and no train state. Checks up front that the configured
    samplers fit the diffusion process.
    """
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.fsdp) if mesh is None else mesh
    model = train_state.build_model(config) if model is None else model
    diffusion = create_diffusion(config)
    check_samplers(config, diffusion)
    if not for_training:
        return Experiment(config, model, diffusion, mesh, None, None, None)
    optimizer = train_state.create_optimizer(config)
    abstract, shardings = train_state.abstract_train_state(config, model, optimizer, mesh)
    return Experiment(config, model, diffusion, mesh, optimizer, abstract, shardings)
