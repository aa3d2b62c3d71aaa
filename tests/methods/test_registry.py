"""The one method registry: every method gives its config class, a State that a checkpoint can
keep (JSON round trip) and `run(context)`; the command line and the configs agree with it."""

import json
import subprocess
import sys
from collections import deque
from dataclasses import replace

import pytest

from demoalign.config import CONFIGS
from demoalign.methods import METHODS, method_of
from demoalign.pairs import Pair


def test_the_registry_serves_every_method_config():
    assert set(METHODS) == set(CONFIGS)
    for name, method in METHODS.items():
        assert method.config_class is CONFIGS[name]
        assert method.config_class.method == name
        module = method.load()
        assert callable(module.run) and callable(module.check)
        assert json.loads(json.dumps(module.State().state_dict())) == module.State().state_dict()


def test_method_of_a_config_and_an_unknown_one():
    assert method_of(CONFIGS["spin"]()).module.endswith(".irft")

    class Other:
        method = "dpo"

    with pytest.raises(TypeError, match="no method for Other"):
        method_of(Other())


def test_irft_state_round_trips_through_json_and_says_where_the_run_is():
    irft = METHODS["irft"].load()
    state = irft.State()
    assert not state.is_done(1) and not state.is_inside(1)
    pair = Pair([1, 2], [3, 0], [4, 0], ref_chosen=-1.25, ref_rejected=-2.5)
    state.start_stage(2, [pair], {"pairs": 1, "prompts_truncated": 1})
    assert state.totals["pairs"] == 1 and state.totals["prompts_truncated"] == 1
    loaded = irft.State()
    loaded.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert loaded == state
    assert loaded.is_done(1) and loaded.is_inside(2) and not loaded.is_done(2)
    loaded.end_stage()
    assert loaded.is_done(2) and not loaded.is_inside(2) and loaded.pairs == []


def test_an_irft_state_saved_with_the_earlier_pair_fields_still_loads():
    irft = METHODS["irft"].load()
    earlier = {
        "index": 1,
        "prompt_ids": [1, 2],
        "demo_ids": [3, 0],
        "negative_ids": [4, 0],
        "ref_demo": -1.25,
        "ref_negative": -2.5,
        "demo_truncated": True,
        "negative_truncated": False,
    }
    state = irft.State()
    state.start_stage(2, [], {"pairs": 1})
    saved = {**state.state_dict(), "pairs": [earlier]}
    state.load_state_dict(json.loads(json.dumps(saved)))
    expected = Pair([1, 2], [3, 0], [4, 0], index=1, ref_chosen=-1.25, ref_rejected=-2.5)
    assert state.pairs == [replace(expected, chosen_truncated=True)]


def test_rft_state_round_trips_through_json():
    rft = METHODS["rft"].load()
    state = rft.State(iteration=1, heldout_ids={3, 1}, heldout_trained={0})
    state.window.extend([(0.5, 1.0), (0.25, 2.0)])
    state.preference_train = [Pair([1], [2, 0], [3, 0], weight=0.5, kind="preference")]
    loaded = rft.State()
    loaded.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert loaded.prepared and not rft.State().prepared
    assert loaded.heldout_ids == {1, 3} and loaded.heldout_trained == {0}
    assert loaded.window == deque([(0.5, 1.0), (0.25, 2.0)]) and loaded.window.maxlen == 10
    assert loaded.preference_train == state.preference_train


def test_the_command_line_loads_without_torch():
    code = "import sys, demoalign.cli, demoalign; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        ("irft", {"stages": 100}, "16 examples cannot fill 100 stages"),
        ("rft", {"outer_iterations": 40}, "cannot fill 40 outer iterations"),
    ],
)
def test_data_a_method_cannot_split_is_refused_before_the_folder_exists(
    tiny_model_dir, tmp_path, cls, overrides, message
):
    from conftest import small_rft_values, small_run_values
    from demoalign.config import build_config
    from demoalign.run import train

    out = tmp_path / "never"
    values = (
        small_rft_values(tiny_model_dir, out, **overrides)
        if cls == "rft"
        else small_run_values(CONFIGS[cls], tiny_model_dir, out, **overrides)
    )
    config = build_config(CONFIGS[cls], values)
    with pytest.raises(ValueError, match=message):
        train(config)
    assert not out.exists()


def test_the_option_reference_has_a_section_for_every_registered_method(monkeypatch):
    from demoalign.config import IRFTConfig
    from demoalign.docs import reference_markdown
    from demoalign.methods import Method

    page = reference_markdown()
    assert all(f"### `{name}`\n" in page for name in METHODS)
    assert "Its options are those of `irft`." not in page  # spin changes the stages default

    class CopyOfIRFT(IRFTConfig):
        """A copy of IRFT."""

    extra = Method("irft2", CopyOfIRFT, "A copy of IRFT.", "demoalign.methods.irft")
    monkeypatch.setitem(METHODS, "irft2", extra)
    page = reference_markdown()
    assert "### `irft2`\n\nA copy of IRFT.\n\nIts options are those of `irft`." in page
