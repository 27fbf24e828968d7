"""Fields shared by every experiment; experiment files override them.

Every field a launcher or the library reads lives here, so that after `lock()` an override of a
field that does not exist (a typo) is an error rather than a silent new field.
"""

import ml_collections


def optional(kind: type, default=None) -> ml_collections.FieldReference:
    """A field that may be unset (None) yet takes `--config.x=...` of type `kind`."""
    return ml_collections.FieldReference(default, field_type=kind)


# Model constructor fields that configs and the command line may override, with their types.
# Unset (None) = the registry's value for the named model (see diffussm_jax.models).
MODEL_OVERRIDE_FIELDS = {
    "hidden_size": int,
    "depth": int,
    "hourglass_ratio": int,
    "state_size": int,
    "ssm_init": str,
    "dt_min": float,
    "dt_max": float,
    "activation": str,
    "num_heads": int,
    "class_dropout_prob": float,
    "label_init_std": float,
    "timestep_init_std": float,
    "pos_embed": str,
    "ssm_backend": str,
}


# Fields that moved: an override of the old name fails with a message naming the new one.
MOVED_FIELDS = {
    "dtype": "precision.compute",
}


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Model: a registry name plus overrides of single constructor fields.
    config.model = "DiffuSSM-XL"
    config.model_overrides = ml_collections.ConfigDict(
        {name: optional(kind) for name, kind in MODEL_OVERRIDE_FIELDS.items()}
    )
    config.learn_sigma = True
    # Which dtype holds what (diffussm_jax.models.precision): stored parameters (and so the
    # optimizer state), matmul inputs and activations, the residual stream, the SSM's FFTs.
    config.precision = ml_collections.ConfigDict(
        dict(params="float32", compute="bfloat16", residual="float32", ssm="float32")
    )
    # Backward-pass recomputation: none | full | save_matmuls | ssm_only (models.layers).
    config.remat = "none"
    config.scan_layers = True

    # Data (a tfds array_record dataset read by grain; see diffussm_jax.data).
    config.data = ml_collections.ConfigDict()
    config.data.name = "embedded_digits"
    config.data.data_dir = optional(str)  # unset: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.split = "train"
    config.data.image_key = "image"
    config.data.label_key = optional(str, "label")  # unset for unconditional data
    config.data.image_size = 32  # H = W of what the model sees (latent size for latents)
    config.data.channels = 1
    config.data.num_classes = 10  # 0: unconditional
    config.data.random_flip = False
    config.data.center_crop = optional(int)  # ADM center crop of raw images to this size
    config.data.latent_scale = optional(float)  # e.g. 0.18215 for Stable Diffusion latents
    config.data.worker_count = 0

    # Frozen VAE of latent datasets (diffussm_jax.vae): decodes sample grids and launch.sample.
    config.vae = ml_collections.ConfigDict()
    # Directory with diffusers' config.json + diffusion_pytorch_model.safetensors (docs/latents.md).
    config.vae.path = optional(str)

    # Diffusion (spec section 5). The defaults are the paper's recipe; docs/objectives.md
    # describes the alternatives.
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.process = "gaussian"  # or "flow" (linear interpolant, needs learn_sigma=False)
    config.diffusion.num_timesteps = 1000  # gaussian
    config.diffusion.schedule = "linear"  # gaussian
    config.diffusion.loss = "hybrid"  # "hybrid" or "mse"; flow: "mse"
    config.diffusion.prediction = "eps"  # gaussian: "eps", "v" or "x0"
    config.diffusion.loss_weighting = "none"  # gaussian: "none" or "min_snr"
    config.diffusion.min_snr_gamma = 5.0  # gamma of min_snr (5 in Hang et al. 2023)
    config.diffusion.t_sampling = "uniform"  # flow: "uniform" or "logit_normal"
    config.diffusion.logit_mean = 0.0  # flow, logit_normal
    config.diffusion.logit_std = 1.0

    # Optimisation: AdamW, lr 1e-4 constant, no weight decay, EMA 0.9999 (DiT recipe).
    config.global_batch_size = 256
    config.num_train_steps = 400_000
    config.learning_rate = 1e-4
    config.warmup_steps = 0
    config.weight_decay = 0.0
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.grad_clip_norm = optional(float)  # e.g. 1.0
    config.ssm_learning_rate = optional(float)  # SSM dynamics (log_dt, A); unset: learning_rate
    config.ema_decay = 0.9999
    config.ema_warmup = False  # True: decay min(ema_decay, (1 + step) / (10 + step))
    config.grad_accum_steps = 1
    config.nonfinite = "skip"  # "skip" the update or "stop" training on a NaN/Inf loss or grad

    # Parallelism: one Mesh with axes ('data', 'fsdp'); -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    # Tensors smaller than this many elements stay replicated under FSDP.
    config.mesh.fsdp_min_size = 2**16

    # Cadence.
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5_000
    config.keep_checkpoints = 3  # the newest N checkpoints (rolling)
    # Milestones: every checkpoint at a multiple of this step is kept for good (and the trainer
    # saves at those steps too); 0: none. launch.sample / launch.evaluate --step read any one.
    config.keep_every_steps = 0
    config.sample_every_steps = 10_000  # 0: no sample grids

    # Sampling during training (EMA params) and defaults for launch/sample.py.
    config.sampling = ml_collections.ConfigDict()
    config.sampling.sampler = "ddpm"  # gaussian: ddpm, ddim, dpm++2m; flow: euler, heun
    config.sampling.steps = 250
    config.sampling.cfg_scale = optional(float, 1.5)  # unset: no guidance
    # Clip each x_0 estimate to [-1, 1]; unset: on for pixel data, off for latents.
    config.sampling.clip_denoised = optional(bool)
    config.sampling.per_class = 4  # grid: one row per class (conditional models)
    config.sampling.num_classes_in_grid = 10
    config.sampling.num_unconditional = 16

    # In-training sample quality every `fid_every_steps` (diffussm_jax.training.hooks),
    # logged as eval/* metrics. Embedded digits: the offline digits classifier scores the samples;
    # other data: Inception features against the reference batch's statistics (both paths set).
    config.eval = ml_collections.ConfigDict()
    config.eval.fid_every_steps = 0  # 0: off
    config.eval.fid_num_samples = 1000
    config.eval.batch_size = optional(int)  # unset: global_batch_size
    config.eval.sampler = optional(str)  # unset: config.sampling.sampler
    config.eval.steps = optional(int)  # unset: config.sampling.steps
    config.eval.cfg_scale = optional(float)  # unset: config.sampling.cfg_scale; 1.0: no guidance
    config.eval.inception_path = optional(str)  # converted weights (launch/convert_inception.py)
    config.eval.reference_path = optional(str)  # ADM reference batch with mu/sigma
    return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'model=DiffuSSM-XL,smoke' -> {'model': 'DiffuSSM-XL', 'smoke': True}, over `defaults`.

    Values are typed like their defaults; a key not in `defaults` is an error.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}."
            )
        default = defaults[key]
        if not value:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            parsed[key] = value
        else:
            parsed[key] = type(default)(value)
    return parsed


def parse_overrides(items: list[str]) -> dict:
    """['diffusion.prediction=eps', 'ema_warmup=false'] -> a dict for `update_from_flattened_dict`.

    Numbers become int or float, true / false / none become bool / None, the rest stay strings.
    """
    overrides = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator:
            raise ValueError(f"override {item!r} is not FIELD=VALUE, e.g. diffusion.prediction=eps")
        overrides[key] = _parse_value(text)
    return overrides


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)
