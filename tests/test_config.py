"""Config values: typed, checked early, with clear messages."""

import ast
import inspect
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from demoalign.config import (
    CONFIGS,
    DECLARED,
    GENERATION_BACKENDS,
    LEADERBOARD_TASKS,
    LOSS_TYPES,
    RESUME_MAY_DIFFER,
    DemoConfig,
    EvalConfig,
    GenerateConfig,
    IRFTConfig,
    RFTConfig,
    SFTConfig,
    SPINConfig,
    TrainConfig,
    build_config,
    load_config,
    opt,
    option_docs,
    options,
    parse_batch_size,
    parse_report_to,
)
from demoalign.config.options import Options


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
    # Other trainers' names, which spelling alone would match to the wrong key (lr -> lora_r).
    with pytest.raises(ValueError, match="did you mean `learning_rate`"):
        load_config(IRFTConfig, None, ["model=m", "data=d", "lr=1e-5"])
    with pytest.raises(ValueError, match="did you mean `epochs`"):
        load_config(SFTConfig, None, ["model=m", "data=d", "num_train_epochs=2"])


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


def test_a_prompt_limit_that_leaves_no_room_names_both_values():
    with pytest.raises(ValueError) as caught:
        build_config(IRFTConfig, {"model": "m", "data": "d", "max_length": 128})
    assert "max_prompt_length=128 must be smaller than max_length=128" in str(caught.value)


# ---------------------------------------------------------------- options declared once

CONFIG_PACKAGE = Path(__file__).resolve().parents[1] / "src" / "demoalign" / "config"
EVERY_CONFIG = (*CONFIGS.values(), TrainConfig, GenerateConfig, EvalConfig, DemoConfig)


def _declarations() -> list[tuple[str, str]]:
    """(option name, file:line) of every `name: type = opt(...)` in the config package."""
    found = []
    for path in sorted(CONFIG_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                call = getattr(item, "value", None)
                if isinstance(item, ast.AnnAssign) and isinstance(call, ast.Call):
                    if getattr(call.func, "id", None) == "opt":
                        found.append((item.target.id, f"{path.name}:{item.lineno}"))
    return found


def test_every_option_is_declared_once():
    places = {}
    for name, where in _declarations():
        places.setdefault(name, []).append(where)
    twice = {name: where for name, where in places.items() if len(where) > 1}
    assert not twice, f"options declared (type and help) in several places: {twice}"
    every_option = {f.name for cls in EVERY_CONFIG for f in fields(cls)}
    assert every_option == set(places), "an option is declared outside the config package"
    for cls in EVERY_CONFIG:  # a config that gives another default keeps the declared help
        for f in fields(cls):
            declared = DECLARED[f.name][1]
            assert (f.type, f.metadata) == (declared.type, declared.metadata), (cls, f.name)


def test_a_second_declaration_is_refused_at_import():
    with pytest.raises(TypeError, match="declared twice"):

        @options()
        class Again(Options):
            beta: float = opt(0.5, "Another β.")

    with pytest.raises(TypeError, match="declared nowhere"):

        @options(no_such_option=1)
        class Unknown(Options):
            pass


def test_commands_change_only_the_default_of_a_shared_option():
    docs = {
        cls: {key: (default, text) for key, default, text in option_docs(cls)}
        for cls in EVERY_CONFIG
    }
    for cls, key, default in [
        (SFTConfig, "learning_rate", "2e-05"),
        (IRFTConfig, "learning_rate", "5e-07"),
        (SPINConfig, "stages", "1"),
        (IRFTConfig, "stages", "5"),
        (EvalConfig, "max_new_tokens", "128"),
        (GenerateConfig, "max_new_tokens", "256"),
        (DemoConfig, "max_new_tokens", "24"),
        (DemoConfig, "batch_size", "16"),
        (EvalConfig, "output_dir", "'runs/eval'"),
    ]:
        assert docs[cls][key][0] == default, (cls, key)
        assert docs[cls][key][1] == DECLARED[key][1].metadata["help"]
    assert SPINConfig(model="m", data="d").stages == 1 and SFTConfig().learning_rate == 2e-5


# ---------------------------------------------------------------- renamed batch sizes


@pytest.mark.parametrize(
    "cls, base, new",
    [
        (GenerateConfig, {"model": "m", "data": "d"}, "generation_batch_size"),
        (EvalConfig, {"models": "m", "pairs": "p"}, "eval_batch_size"),
    ],
)
def test_the_old_batch_size_key_is_mapped_with_one_deprecation_line(
    cls, base, new, tmp_path, capsys
):
    config = load_config(cls, None, [f"{k}={v}" for k, v in base.items()] + ["batch_size=4"])
    assert getattr(config, new) in (4, "4") and not hasattr(config, "batch_size")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`batch_size` is deprecated" in err[0] and f"`{new}`" in err[0]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(yaml.safe_dump({**base, "batch_size": 3}))
    assert getattr(load_config(cls, str(yaml_file), []), new) in (3, "3")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=f"keep only `{new}`"):
        build_config(cls, {**base, "batch_size": 4, new: 4})
    build_config(cls, {**base, new: 2})
    assert capsys.readouterr().err == "", "the new key prints nothing"


def test_training_batch_size_is_not_renamed(capsys):
    config = build_config(IRFTConfig, {**REQUIRED, "batch_size": 2, "generation_batch_size": 4})
    assert config.batch_size == 2 and config.generation_batch_size == "4"
    assert capsys.readouterr().err == ""


def test_eval_generates_with_its_batch_size():
    config = build_config(EvalConfig, {"models": "m", "pairs": "p", "eval_batch_size": 5})
    assert config.generation_batch_size == 5  # what generation.generate_responses reads


# ---------------------------------------------------------------- layering and shared lists


def test_config_imports_nothing_above_it():
    allowed_top = set(sys.stdlib_module_names) | {"yaml", "__future__"}
    for path in sorted(CONFIG_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom):
                inside = node.level == 1 or (node.module or "").split(".")[0] == "data"
                assert node.level <= 2 and inside, (
                    f"{path.name}:{node.lineno} imports {node.module}"
                )
                continue
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (
                    top in allowed_top
                    or name == "demoalign.data"
                    or name.startswith("demoalign.data.")
                )
                assert ok, f"{path.name}:{node.lineno} imports {name}"


def test_the_choice_lists_are_the_ones_their_users_use():
    from demoalign import generation, losses, tracking
    from demoalign.eval import leaderboard

    assert losses.LOSS_TYPES is LOSS_TYPES
    assert tracking.parse_report_to is parse_report_to
    assert leaderboard.parse_tasks("all") == list(LEADERBOARD_TASKS)
    assert tuple(leaderboard.TASKS) == LEADERBOARD_TASKS
    # generation keeps a copy of these two: they must stay equal to config's.
    assert tuple(generation.BACKENDS) == GENERATION_BACKENDS
    for value in ("auto", "AUTO", None, 1, 8, "32", " 4 "):
        assert generation.parse_batch_size(value) == parse_batch_size(value)
    for bad in (0, -1, "x", "1.5", True, "08"):
        with pytest.raises(ValueError):
            generation.parse_batch_size(bad)
        with pytest.raises(ValueError):
            parse_batch_size(bad)


# ---------------------------------------------------------------- help texts say what the code does


def test_resume_help_names_exactly_the_keys_check_resume_ignores():
    from demoalign.runio import check_resume

    ignored = inspect.signature(check_resume).parameters["ignored"].default
    assert tuple(ignored) == RESUME_MAY_DIFFER
    help_text = DECLARED["resume"][1].metadata["help"]
    assert f"except {', '.join(ignored)})" in help_text


def test_demo_help_names_every_method():
    from demoalign.cli import build_parser

    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    for text in (DemoConfig.__doc__, demo.description):
        assert all(m in text for m in ("SFT", "SPIN", "IRFT", "RFT")), text


def test_decode_reference_logps_help_gives_the_measured_bf16_gap():
    help_text = DECLARED["reference_logps"][1].metadata["help"]
    assert "0.29 nats" in help_text and "1.19" in help_text and "0.1 nats" not in help_text
