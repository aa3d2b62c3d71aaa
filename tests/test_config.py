"""Config values: typed, checked early, with clear messages."""

from dataclasses import fields

import pytest
import yaml

from demoalign.config import (
    EvalConfig,
    GenerateConfig,
    IRFTConfig,
    RFTConfig,
    SPINConfig,
    build_config,
    load_config,
)


@pytest.mark.parametrize("key, value", [("beta", "0"), ("top_p", "1.5"), ("temperature", "0")])
def test_generation_and_loss_settings_are_checked_early(key, value):
    from demoalign.config import IRFTConfig, load_config

    with pytest.raises(ValueError, match=key):
        load_config(IRFTConfig, None, ["model=m", "data=d", f"{key}={value}"])


REQUIRED = dict(model="m", data="d")


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ValueError, match="did you mean `learning_rate`"):
        build_config(IRFTConfig, {**REQUIRED, "learnig_rate": 1e-3})
    with pytest.raises(ValueError, match="did you mean `stages`"):
        load_config(IRFTConfig, None, ["model=m", "data=d", "stage=3"])


def test_values_are_typed_and_checked(tmp_path):
    cfg = load_config(
        IRFTConfig,
        None,
        ["model=m", "data=d", "learning_rate=1e-3", "stages=4", "greedy=true", "beta=1"],
    )
    assert cfg.learning_rate == 1e-3 and cfg.stages == 4 and cfg.greedy is True and cfg.beta == 1.0
    with pytest.raises(ValueError, match="expects int"):
        load_config(IRFTConfig, None, ["model=m", "data=d", "stages=two"])
    with pytest.raises(ValueError, match="loss_type"):
        load_config(IRFTConfig, None, ["model=m", "data=d", "loss_type=ipo"])
    with pytest.raises(ValueError, match="stages"):
        load_config(SPINConfig, None, ["model=m", "data=d", "stages=2"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(yaml.safe_dump({"model": "m", "data": "d", "beta": 0.5, "stages": 3}))
    cfg = load_config(IRFTConfig, str(yaml_file), ["stages=8"])
    assert cfg.beta == 0.5 and cfg.stages == 8, "command-line keys override the YAML"


def test_interface_keys_exist():
    names = {f.name for f in fields(IRFTConfig)}
    fixed = {
        "model",
        "data",
        "output_dir",
        "stages",
        "epochs_per_stage",
        "iterations",
        "beta",
        "loss_type",
        "learning_rate",
        "optimizer",
        "batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "max_prompt_length",
        "max_new_tokens",
        "temperature",
        "top_p",
        "template",
        "seed",
        "overwrite",
    }
    assert fixed <= names


@pytest.mark.parametrize("cls", [IRFTConfig, RFTConfig, GenerateConfig, EvalConfig])
@pytest.mark.parametrize(
    "key,value,message",
    [
        ("temperature", 0.0, "temperature"),
        ("top_p", 1.5, "top_p"),
        ("max_new_tokens", 0, "max_new"),
    ],
)
def test_sampling_options_are_checked_the_same_way_everywhere(cls, key, value, message):
    base = {"models": "m", "pairs": "p"} if cls is EvalConfig else {"model": "m", "data": "d"}
    with pytest.raises(ValueError, match=message):
        build_config(cls, {**base, key: value})
