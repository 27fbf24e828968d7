"""Every config loads, is locked, and carries the fields the launchers rely on."""

import importlib

import pytest

from configs import base
from diffussm_jax import models

CONFIGS = ["quickstart", "imagenet256", "imagenet512", "lsun"]
REQUIRED = [
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
    assert config.model in models.names()
    with pytest.raises(AttributeError, match="global_batchsize"):
        config.global_batchsize = 8


def test_variants_and_arguments():
    from configs import imagenet256, imagenet512, lsun, quickstart

    assert imagenet256.get_config("model=DiT-XL/2").model == "DiT-XL/2"
    assert imagenet512.get_config().data.image_size == 64
    assert lsun.get_config("category=bedroom").data.num_classes == 0
    smoke = quickstart.get_config("smoke")
    assert smoke.num_train_steps == 20 and smoke.model_overrides.hidden_size == 32
    with pytest.raises(ValueError, match="unknown config argument 'modle'"):
        quickstart.get_config("modle=DiT-S/2")
    with pytest.raises(ValueError, match="unknown LSUN category"):
        lsun.get_config("category=cats")


def test_parse_arg_types():
    parsed = base.parse_arg("steps=5,smoke,name=x", steps=0, smoke=False, name=None)
    assert parsed.steps == 5 and parsed.smoke is True and parsed.name == "x"
