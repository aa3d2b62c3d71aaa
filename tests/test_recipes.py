"""recipes/: every demoalign recipe loads through demoalign's own config loader and passes its
validation (model and data overridden to tiny local values), keeps the settings it promises, and
runs end to end on a tiny model; every accelerate config loads with accelerate's own loader, names
the expected distributed type, and has only keys that `accelerate launch` knows (accelerate's
loader checks the top-level keys but not those inside fsdp_config / deepspeed_config)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

from conftest import DOLLY, read_metrics
from demoalign.config import CONFIGS, DemoConfig, load_config
from demoalign.templates import resolve_template

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACCELERATE = RECIPES / "accelerate"
TRAINING_RECIPES = sorted(p.name for p in RECIPES.glob("*.yaml") if p.name != "demo.yaml")

# What each recipe promises (the paper's settings); a recipe edited away from them fails here.
PROMISED = {
    "zephyr-7b-irft.yaml": dict(
        method="irft",
        stages=5,
        beta=0.1,
        learning_rate=5e-7,
        optimizer="rmsprop",
        mixed_precision="bf16",
        loss_type="sigmoid",
        sft_weight=0.0,
    ),
    "spin.yaml": dict(
        method="spin",
        stages=1,
        beta=0.1,
        learning_rate=5e-7,
        optimizer="rmsprop",
        mixed_precision="bf16",
        sft_weight=0.0,
    ),
    "pythia-1.4b-hh-irft.yaml": dict(
        method="irft", stages=5, beta=0.1, template="hh", mixed_precision="bf16"
    ),
}

# accelerate config -> (distributed type, what its plugin must hold)
EXPECTED_ACCELERATE = {
    "ddp.yaml": ("MULTI_GPU", {}),
    "fsdp2.yaml": (
        "FSDP",
        {
            "fsdp_version": 2,
            "reshard_after_forward": True,  # FSDP2's FULL_SHARD
            "auto_wrap_policy": "transformer_auto_wrap_policy",
            "state_dict_type": "StateDictType.FULL_STATE_DICT",
        },
    ),
    "zero2.yaml": ("DEEPSPEED", {"zero_stage": 2, "zero3_init_flag": False}),
    "zero3.yaml": (
        "DEEPSPEED",
        {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True},
    ),
}


def tiny_overrides(tiny_model_dir, out) -> list[str]:
    return [f"model={tiny_model_dir}", f"data={DOLLY}", f"output_dir={out}"]


def recipe_method(path: Path) -> str:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["method"]


def test_every_recipe_is_covered():
    assert set(TRAINING_RECIPES) == set(PROMISED), "a recipe without promised settings here"
    assert {p.name for p in ACCELERATE.glob("*.yaml")} == set(EXPECTED_ACCELERATE)


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_recipe_loads_and_validates(name, tiny_model_dir, tokenizer, tmp_path):
    path = RECIPES / name
    method = recipe_method(path)
    config = load_config(CONFIGS[method], str(path), tiny_overrides(tiny_model_dir, tmp_path))
    assert config.method == method
    for key, value in PROMISED[name].items():
        assert getattr(config, key) == value, f"{name}: {key}"
    # The template is only checked when a run resolves it: check it here (the tiny tokenizer
    # has no chat template, so `auto` resolves to instruction).
    resolve_template(tokenizer, config.template)


def test_demo_recipe_loads():
    config = load_config(DemoConfig, str(RECIPES / "demo.yaml"), [])
    assert config.arm_list()[0] == "sft"


def test_a_misspelt_recipe_key_is_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken.yaml"
    text = (RECIPES / "zephyr-7b-irft.yaml").read_text(encoding="utf-8")
    broken.write_text(text.replace("epochs_per_stage:", "epochs_per_stag:"), encoding="utf-8")
    with pytest.raises(ValueError, match="did you mean `epochs_per_stage`"):
        load_config(CONFIGS["irft"], str(broken), tiny_overrides(tiny_model_dir, tmp_path))


def test_recipes_need_model_and_data():
    """The recipes leave the start model to the user."""
    with pytest.raises(ValueError, match="`model` is required"):
        load_config(CONFIGS["irft"], str(RECIPES / "zephyr-7b-irft.yaml"), [])


# The paper's public data sets, named by hub id (and split) as `datasets.load_dataset` names them.
DATA_SETS = {
    "zephyr-7b-irft.yaml": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
    "spin.yaml": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
    "pythia-1.4b-hh-irft.yaml": ("Anthropic/hh-rlhf", ""),
}


def no_network(*args, **kwargs):
    raise AssertionError("validating a recipe touched the network")


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_recipes_name_public_data_sets_and_validate_offline(
    name, tiny_model_dir, tmp_path, monkeypatch
):
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = RECIPES / name
    overrides = [f"model={tiny_model_dir}", f"output_dir={tmp_path}"]
    config = load_config(CONFIGS[recipe_method(path)], str(path), overrides)
    assert (config.data, config.data_split) == DATA_SETS[name]
    assert set(DATA_SETS) == set(TRAINING_RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_recipe_runs_on_a_tiny_model(name, tiny_model_dir, tmp_path, one_thread):
    """Every key of the recipe as it is, except the sizes, on the tiny model on CPU in fp32."""
    from demoalign import train

    path = RECIPES / name
    method = recipe_method(path)
    small = [
        "max_examples=10",
        "max_length=64",
        "max_prompt_length=32",
        "max_new_tokens=8",
        "batch_size=2",
        "mixed_precision=no",
        "cpu=true",
        "show_progress=false",
        "keep_checkpoints=0",
        "generation_batch_size=8",
    ]
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, out) + small
    config = load_config(CONFIGS[method], str(path), overrides)
    train(config)
    steps = [r for r in read_metrics(out) if "loss" in r]
    stages = [r for r in read_metrics(out) if r.get("event") == "stage_start"]
    assert len(stages) == config.stages * config.iterations
    assert len(steps) >= len(stages) * config.epochs_per_stage
    assert (out / "final" / "config.json").is_file()


# ---------------------------------------------------------------- accelerate configs


def launch_keys() -> set[str]:
    """Every option `accelerate launch` takes (the names config-file keys are copied onto)."""
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def unknown_plugin_keys(config) -> list[str]:
    """Keys of fsdp_config / deepspeed_config that `accelerate launch` would silently ignore.
    The launcher copies fsdp_config's `x` to the option `fsdp_x` and deepspeed_config's keys as
    they are (accelerate/commands/launch.py, _validate_launch_command)."""
    known = launch_keys()
    bad = []
    for key in config.fsdp_config:
        name = key if key.startswith("fsdp") else f"fsdp_{key}"
        if name not in known:
            bad.append(f"fsdp_config.{key}")
    for key in config.deepspeed_config:
        if key not in known:
            bad.append(f"deepspeed_config.{key}")
    return bad


def launched_plugin(path: Path):
    """The environment `accelerate launch --config_file PATH` would give the processes, and the
    FSDP or DeepSpeed plugin an Accelerator would build from it (DeepSpeed need not be
    installed for this)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "--main_process_port", "0", "-m", "demoalign", "irft"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        if args.use_fsdp:
            return args, FullyShardedDataParallelPlugin()
        if args.use_deepspeed:
            return args, DeepSpeedPlugin()
    return args, None


@pytest.mark.parametrize("name", sorted(EXPECTED_ACCELERATE))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    expected_type, plugin_fields = EXPECTED_ACCELERATE[name]
    config = load_config_from_file(str(ACCELERATE / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == expected_type
    assert config.num_processes == 8 and config.num_machines == 1
    assert config.mixed_precision == "bf16"
    assert unknown_plugin_keys(config) == []

    args, plugin = launched_plugin(ACCELERATE / name)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    for field, value in plugin_fields.items():
        got = getattr(plugin, field)
        got = getattr(got, "__name__", got) if field == "auto_wrap_policy" else got
        assert str(got) == str(value), f"{name}: {field} is {got!r}"
    if expected_type == "DEEPSPEED":
        ds = plugin.deepspeed_config
        assert ds["zero_optimization"]["stage"] == plugin_fields["zero_stage"]
        # demoalign's loop steps once per backward: DeepSpeed must not accumulate on its own.
        assert ds["gradient_accumulation_steps"] == 1


def test_a_misspelt_accelerate_key_is_refused(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    text = (ACCELERATE / "fsdp2.yaml").read_text(encoding="utf-8")
    top = tmp_path / "top.yaml"
    top.write_text(text.replace("num_processes:", "num_proceses:"), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(top))
    # Inside fsdp_config accelerate's loader accepts anything; the check above catches it.
    inner = tmp_path / "inner.yaml"
    inner.write_text(
        text.replace("fsdp_reshard_after_forward:", "fsdp_reshard_after_foward:"), encoding="utf-8"
    )
    assert unknown_plugin_keys(load_config_from_file(str(inner))) == [
        "fsdp_config.fsdp_reshard_after_foward"
    ]
    zero = tmp_path / "zero.yaml"
    zero.write_text(
        (ACCELERATE / "zero3.yaml").read_text(encoding="utf-8").replace("zero_stage:", "zero:"),
        encoding="utf-8",
    )
    assert unknown_plugin_keys(load_config_from_file(str(zero))) == ["deepspeed_config.zero"]


def test_docs_name_every_recipe():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text("utf-8")
    for name in TRAINING_RECIPES:
        assert f"recipes/{name}" in docs
    for name in EXPECTED_ACCELERATE:
        assert f"recipes/accelerate/{name}" in docs


def test_module_entry_point_exists():
    """The documented launch line runs `-m demoalign`: the package has a __main__."""
    import demoalign

    assert (Path(demoalign.__file__).parent / "__main__.py").is_file()
