"""Train state (params, EMA, optimizer, step, rng), the optimizer, and sharded creation."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from diffussm_jax import models, parallel, ssm


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32, number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data; per-step keys are fold_in(rng, step)


# The flow process hands the network t in [0, 1]; its timestep embedding sees 1000 t, the range of
# the Gaussian process's steps 0..999 (models.layers.Conditioning).
FLOW_TIMESTEP_SCALE = 1000.0


# Config fields that moved, old dotted path -> new one. A command-line override of an old path
# fails naming the new one (launch.cli); a config saved with a run before the move (its
# config.json) is read with its values moved (`upgrade_saved_config`). "model", the registry
# name before it was `model_name`, comes before the fields that move into the `model` block.
_OLD_SSM_FIELDS = {
    "state_size": "state_size",
    "ssm_init": "init",
    "dt_min": "dt_min",
    "dt_max": "dt_max",
    "ssm_backend": "backend",
}
_OLD_MODEL_OVERRIDES = (
    "hidden_size",
    "depth",
    "hourglass_ratio",
    "activation",
    "num_heads",
    "class_dropout_prob",
    "label_init_std",
    "timestep_init_std",
    "pos_embed",
)
MOVED_FIELDS: dict[str, str] = {
    "dtype": "precision.compute",
    "model": "model_name",
    "learn_sigma": "model.learn_sigma",
    "remat": "model.remat",
    "scan_layers": "model.scan_layers",
    **{f"model_overrides.{name}": f"model.{name}" for name in _OLD_MODEL_OVERRIDES},
    **{f"model_overrides.{old}": f"model.ssm.{new}" for old, new in _OLD_SSM_FIELDS.items()},
}


# Config fields added after runs were saved without them, with the values those runs used (the
# paper's recipe, no VAE, no in-training evaluation); `upgrade_saved_config` fills them in.
ADDED_FIELDS: dict[str, Any] = {
    "diffusion.process": "gaussian",
    "diffusion.prediction": "eps",
    "diffusion.loss_weighting": "none",
    "diffusion.min_snr_gamma": 5.0,
    "diffusion.t_sampling": "uniform",
    "diffusion.logit_mean": 0.0,
    "diffusion.logit_std": 1.0,
    "vae.path": None,
    "eval.fid_every_steps": 0,
    "eval.sampler": None,
}


def upgrade_saved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A run's saved config in the current layout (locked): each old field of `MOVED_FIELDS`
    that holds a value (not a block) is moved to its new path, and each field of `ADDED_FIELDS`
    it lacks gets the value such runs used; a current config is unchanged. The one place that
    knows old layouts: everything else reads the current one.

    E.g. {"model": "DiffuSSM-S", "model_overrides": {"state_size": 16}, "learn_sigma": False}
    becomes {"model_name": "DiffuSSM-S", "model": {"ssm": {"state_size": 16},
    "learn_sigma": False}}, and {"dtype": "bfloat16"} becomes {"precision": {"compute":
    "bfloat16"}} (the other roles at their defaults).
    """
    tree = config.to_dict()
    for old, new in MOVED_FIELDS.items():
        *old_parents, old_name = old.split(".")
        holder = tree
        for key in old_parents:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or isinstance(holder.get(old_name, {}), dict):
            continue  # absent, or a block of the current layout (`model`)
        value = holder.pop(old_name)
        *new_parents, new_name = new.split(".")
        target = tree
        for key in new_parents:
            target = target.setdefault(key, {})
        target[new_name] = value
    if tree.get("model_overrides") == {}:
        del tree["model_overrides"]
    for path, value in ADDED_FIELDS.items():
        *parents, name = path.split(".")
        holder = tree
        for key in parents:
            holder = holder.setdefault(key, {})
        holder.setdefault(name, value)
    upgraded = ml_collections.ConfigDict(tree)
    upgraded.lock()
    return upgraded


def _model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The constructor fields `config.model` sets (the unset ones, None, are left out), with
    the `ssm` block as one `ssm.SSMSettings`."""
    fields = {name: value for name, value in config.model.items() if value is not None}
    if "ssm" in fields:
        settings = {name: value for name, value in fields.pop("ssm").items() if value is not None}
        if settings:
            fields["ssm"] = ssm.SSMSettings(**settings)
    return fields


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The registry model `config.model_name` with the fields `config.model` sets, its input
    from `config.data` and its dtypes from `config.precision`.

    Its `timestep_scale` follows `config.diffusion.process` (1, or `FLOW_TIMESTEP_SCALE` for flow).

    Raises:
      models.ModelFieldError: `config.model` sets a field the named model lacks.
    """
    flow = config.diffusion.process == "flow"
    return models.create(
        config.model_name,
        input_size=config.data.image_size,
        in_channels=config.data.channels,
        num_classes=config.data.num_classes,
        precision=models.Precision.from_config(config.precision),
        timestep_scale=FLOW_TIMESTEP_SCALE if flow else 1.0,
        **_model_fields(config),
    )


def _param_group(path: tuple[Any, ...], _) -> str:
    """'ssm' for the SSM dynamics (log_dt, A), 'default' for everything else.

    The name is the last dict key on the path: boxed (logically partitioned) parameters add
    an attribute step after it.
    """
    keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return "ssm" if keys and keys[-1] in ssm.SSM_DYNAMICS_PARAMS else "default"


def learning_rates(config: ml_collections.ConfigDict) -> dict[str, float | optax.Schedule]:
    """{"default", "ssm"}: the learning rate of each parameter group, a float or (with warmup)
    a schedule of the update index. The SSM dynamics use `config.ssm_learning_rate` if set.

    A constant stays a float: a schedule would add a counter to the optimizer state, and
    checkpoints of runs without warmup would no longer restore.
    """

    def schedule(lr: float) -> float | optax.Schedule:
        if config.warmup_steps:
            return optax.linear_schedule(0.0, lr, config.warmup_steps)
        return lr

    ssm_lr = config.learning_rate if config.ssm_learning_rate is None else config.ssm_learning_rate
    return {"default": schedule(config.learning_rate), "ssm": schedule(ssm_lr)}


def learning_rate_at(config: ml_collections.ConfigDict, update_index: int) -> dict[str, float]:
    """The learning rates the `update_index`-th update (from 0) used, per parameter group."""
    return {
        group: float(rate(update_index) if callable(rate) else rate)
        for group, rate in learning_rates(config).items()
    }


def create_optimizer(
    config: ml_collections.ConfigDict, keep_moments: jax.Array | None = None
) -> optax.GradientTransformation:
    """AdamW (DiT recipe: lr 1e-4 constant, wd 0), optional warmup and global-norm clipping.

    The SSM dynamics parameters get their own learning rate and never weight decay: decaying
    log_dt or log(-Re A) towards 0 would change time scales, not shrink weights.

    `keep_moments` (a traced bool, for the train step's skipped updates): where True, Adam's
    betas are 1, so zero gradients leave both moments exactly as they were; the state has the
    same structure as without it.
    """
    rates = learning_rates(config)
    betas = dict(b1=config.adam_b1, b2=config.adam_b2)
    if keep_moments is not None:
        betas = {name: jnp.where(keep_moments, 1.0, beta) for name, beta in betas.items()}
    groups = optax.multi_transform(
        {
            "default": optax.adamw(rates["default"], weight_decay=config.weight_decay, **betas),
            "ssm": optax.adam(rates["ssm"], **betas),
        },
        lambda params: jax.tree_util.tree_map_with_path(_param_group, params),
    )
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), groups)
    return groups


def init_variables(model: nn.Module, rng: jax.Array) -> Any:
    """Boxed (logically partitioned) parameters of `model`."""
    x, t, y = (
        jnp.zeros(spec.shape, spec.dtype) for spec in models.example_inputs(model, batch_size=1)
    )
    return model.init({"params": rng}, x, t, y)["params"]


def _create_boxed_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation):
    params = init_variables(model, rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
    )


def _boxed_abstract_state(config, model, tx):
    create = functools.partial(_create_boxed_state, model=model, tx=tx)
    return create, jax.eval_shape(create, jax.random.key(config.seed))


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, Any]:
    """Creates the state already sharded over `mesh` (nothing is materialised unsharded).

    Returns:
      (state, state_shardings) with the shardings tree matching `state`.
    """
    create, boxed = _boxed_abstract_state(config, model, tx)
    shardings = parallel.state_shardings(boxed, mesh, min_size=config.mesh.fsdp_min_size)
    state = jax.jit(lambda r: nn.meta.unbox(create(r)), out_shardings=shardings)(
        jax.random.key(config.seed)
    )
    return state, shardings


def abstract_train_state(config, model, tx, mesh) -> tuple[TrainState, Any]:
    """ShapeDtypeStructs (with shardings) of the state, for restoring and ahead-of-time compiles."""
    _, boxed = _boxed_abstract_state(config, model, tx)
    shardings = parallel.state_shardings(boxed, mesh, min_size=config.mesh.fsdp_min_size)
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def abstract_params(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh) -> Any:
    """ShapeDtypeStructs (with shardings) of the parameters alone: what inference restores (the
    EMA copy), without building an optimizer. Sharded as `abstract_train_state` shards them."""
    boxed = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(config.seed))
    shardings = parallel.state_shardings(boxed, mesh, min_size=config.mesh.fsdp_min_size)
    return jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
