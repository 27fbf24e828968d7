"""Fields shared by every experiment; experiment files override them.

Every field a launcher or the library reads lives here, so that after `lock()` an override of a
field that does not exist (a typo) is an error rather than a silent new field.
"""

import dataclasses
import types
import typing
from typing import Any

import ml_collections

from diffussm_jax import models


def optional(kind: type, default=None) -> ml_collections.FieldReference:
    """A field that may be unset (None) yet takes `--config.x=...` of type `kind`."""
    return ml_collections.FieldReference(default, field_type=kind)


# Constructor fields that `config.model` does not hold: build_model (diffussm_jax.training.
# train_state) derives them from the data (input_size, in_channels, num_classes), the diffusion
# process (timestep_scale) and the precision policy (the dtypes).
DERIVED_MODEL_FIELDS = frozenset(
    {
        "input_size",
        "in_channels",
        "num_classes",
        "timestep_scale",
        "dtype",
        "param_dtype",
        "residual_dtype",
        "ssm_dtype",
    }
)


def model_block() -> ml_collections.ConfigDict:
    """`config.model`: every constructor field of the registry's model classes but the derived
    ones, unset (None: the registry's value for `config.model_name`) and typed from the class's
    annotations, so `--config.model.depth=2` parses and `--config.model.dpeth=2` is an error.

    A field holding a dataclass of settings (DiffuSSM's `ssm: SSMSettings`) becomes a nested
    block of its fields: `--config.model.ssm.state_size=16`. The block is the union over the
    classes; `models.create` rejects a set field that the chosen class lacks (num_heads for a
    DiffuSSM).
    """
    block, hints_seen = {}, {}
    for cls in dict.fromkeys(models.model_class(name) for name in models.names()):
        hints = typing.get_type_hints(cls)
        for name in models.constructor_fields(cls):
            if name in DERIVED_MODEL_FIELDS:
                continue
            if hints_seen.setdefault(name, hints[name]) != hints[name]:
                raise TypeError(
                    f"{cls.__name__}.{name} is {hints[name]} but another model's {name} is "
                    f"{hints_seen[name]}: one config field cannot take both."
                )
            block[name] = _placeholder(f"{cls.__name__}.{name}", hints[name])
    return ml_collections.ConfigDict(block)


def _placeholder(
    owner: str, hint: Any
) -> ml_collections.FieldReference | ml_collections.ConfigDict:
    """An unset config field for a constructor field annotated `hint`; a block for a dataclass."""
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        fields = dataclasses.fields(hint)
        return ml_collections.ConfigDict(
            {f.name: _placeholder(f"{owner}.{f.name}", hints[f.name]) for f in fields}
        )
    return optional(_kind(owner, hint))


def _kind(owner: str, hint: Any) -> type:
    """The one type a command line gives a field annotated `hint`: int for int, str for
    Literal["lin", "inv"], str for `bool | str` (remat: the model parses "true" or "full")."""
    if hint in (bool, int, float, str):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal and len({type(arg) for arg in args}) == 1:
        return type(args[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [arg for arg in args if arg is not type(None)]
        if str in kinds:
            return str
        if len(kinds) == 1:
            return _kind(owner, kinds[0])
    raise TypeError(
        f"{owner}: a config field cannot hold {hint}; give the constructor field a plain type "
        "(bool, int, float, str, a Literal or a settings dataclass) or list it in "
        "DERIVED_MODEL_FIELDS."
    )


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Model: a registry name, and the constructor fields this run sets (see `model_block`).
    config.model_name = "DiffuSSM-XL"
    config.model = model_block()
    config.model.learn_sigma = True
    # Backward-pass recomputation: none | full | save_matmuls | ssm_only (models.layers).
    config.model.remat = "none"
    config.model.scan_layers = True
    # Which dtype holds what (diffussm_jax.models.precision): stored parameters (and so the
    # optimizer state), matmul inputs and activations, the residual stream, the SSM's FFTs.
    # A policy of the run rather than a model field: it sets four dtype fields of either model.
    config.precision = ml_collections.ConfigDict(
        dict(params="float32", compute="bfloat16", residual="float32", ssm="float32")
    )

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
    config.diffusion.process = (
        "gaussian"  # or "flow" (linear interpolant, needs model.learn_sigma=False)
    )
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


def apply_smoke(
    config: ml_collections.ConfigDict, *, global_batch_size: int = 8, classes_in_grid: int = 4
) -> None:
    """`:smoke` of every experiment: shrinks `config` in place to a tiny model (width 32, depth
    2, float32) and 20 steps, a seconds-per-step CPU check of the whole pipeline.

    Experiments differ in `global_batch_size` and in the classes of the sample grid
    (`classes_in_grid`); the rest is the same everywhere.
    """
    config.precision.compute = "float32"
    config.model.remat = "none"
    config.model.scan_layers = True  # the layout of accelerator runs, which the tests check
    config.model.hidden_size = 32
    config.model.depth = 2
    if "num_heads" in models.constructor_fields(models.model_class(config.model_name)):
        config.model.num_heads = 4
    else:
        config.model.ssm.state_size = 8
    config.global_batch_size = global_batch_size
    config.num_train_steps = 20
    config.warmup_steps = 0
    config.log_every_steps = 10
    config.checkpoint_every_steps = 10
    config.sample_every_steps = 20
    config.sampling.sampler = "dpm++2m"
    config.sampling.steps = 5
    config.sampling.per_class = 1
    config.sampling.num_classes_in_grid = classes_in_grid
    config.sampling.num_unconditional = 4


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
