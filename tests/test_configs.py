"""Every config loads, is locked, and carries the fields the launchers rely on."""

import importlib
import json

import pytest

from configs import base, quickstart
from diffussm_jax import inference, models
from diffussm_jax.training import train_state

CONFIGS = ["quickstart", "imagenet256", "imagenet512", "lsun"]
REQUIRED = [
    "model_name",
    "model",
    "seed",
    "global_batch_size",
    "num_train_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "sample_every_steps",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_locked_with_required_fields(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    for field in REQUIRED:
        assert field in config
    assert config.model_name in models.names()
    with pytest.raises(AttributeError, match="global_batchsize"):
        config.global_batchsize = 8


def test_variants_and_arguments():
    from configs import imagenet256, imagenet512, lsun, quickstart

    assert imagenet256.get_config("model=DiT-XL/2").model_name == "DiT-XL/2"
    assert imagenet512.get_config().data.image_size == 64
    assert lsun.get_config("category=bedroom").data.num_classes == 0
    smoke = quickstart.get_config("smoke")
    assert smoke.num_train_steps == 20 and smoke.model.hidden_size == 32
    with pytest.raises(ValueError, match="unknown config argument 'modle'"):
        quickstart.get_config("modle=DiT-S/2")
    with pytest.raises(ValueError, match="unknown LSUN category"):
        lsun.get_config("category=cats")


def test_parse_arg_types():
    parsed = base.parse_arg("steps=5,smoke,name=x", steps=0, smoke=False, name=None)
    assert parsed.steps == 5 and parsed.smoke is True and parsed.name == "x"


def test_model_block_is_typed_from_the_constructors():
    config = base.get_base_config()
    config.lock()
    config.model.hidden_size = 64
    config.model.ssm.init = "inv"
    with pytest.raises(TypeError):
        config.model.hidden_size = "wide"
    with pytest.raises(AttributeError, match="hiden_size"):
        config.model.hiden_size = 64
    with pytest.raises(AttributeError, match="state_sise"):
        config.model.ssm.state_sise = 8
    fields = set().union(
        *(models.constructor_fields(models.model_class(n)) for n in models.names())
    )
    assert base.DERIVED_MODEL_FIELDS < fields
    assert set(config.model) == fields - base.DERIVED_MODEL_FIELDS


def test_a_field_the_named_model_lacks_is_named_with_the_valid_ones():
    config = quickstart.get_config("smoke")
    config.model.num_heads = 4
    with pytest.raises(models.ModelFieldError, match=r"no field\(s\) \['num_heads'\].*'ssm'"):
        train_state.build_model(config)
    dit = quickstart.get_config("smoke,model=DiT-S/2")
    dit.model.ssm.state_size = 8
    with pytest.raises(models.ModelFieldError, match=r"\['ssm'\].*'num_heads'"):
        train_state.build_model(dit)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("model_name", ["DiffuSSM-S", "DiT-S/2"])
def test_smoke_builds_the_tiny_model_of_every_experiment(name, model_name):
    config = importlib.import_module(f"configs.{name}").get_config(f"smoke,model={model_name}")
    model = train_state.build_model(config)
    assert (model.hidden_size, model.depth, config.num_train_steps) == (32, 2, 20)
    assert model.ssm.state_size == 8 if model_name == "DiffuSSM-S" else model.num_heads == 4


def test_a_config_saved_before_the_model_block_builds_the_same_model(tmp_path):
    """launch.sample / launch.evaluate read a workdir saved with the old layout: the registry
    name in `model`, flat `model_overrides`, top-level learn_sigma / remat / scan_layers."""
    config = quickstart.get_config("smoke")
    old = config.to_dict()
    old["model"] = old.pop("model_name")
    for name in ("learn_sigma", "remat", "scan_layers"):
        old[name] = config.model[name]
    old["model_overrides"] = dict(
        hidden_size=32, depth=2, label_init_std=1.0, pos_embed="sincos", state_size=8,
        ssm_init=None, dt_min=None, dt_max=None, ssm_backend=None, num_heads=None,
    )  # fmt: skip
    del old["precision"]
    old["dtype"] = "float32"
    (tmp_path / "config.json").write_text(json.dumps(old))
    saved = inference.load_config(str(tmp_path))
    assert saved.model_name == "DiffuSSM-S" and "model_overrides" not in saved
    assert saved.model.ssm.state_size == 8 and saved.model.learn_sigma is False
    assert train_state.build_model(saved) == train_state.build_model(config)
