"""train(): inputs checked before the folder is touched, a truthful run state, NaN stops."""

from dataclasses import replace

import pytest

from conftest import read_metrics, small_run_config
from demoalign import IRFTConfig, SFTConfig, train
from demoalign import run as run_module
from demoalign.models import check_model_path
from demoalign.runio import MARKER, RunFolderError, read_run_state
from demoalign.trainer import NonFiniteError


def test_a_finished_run_is_marked_finished_and_unlocked(tiny_model_dir, tmp_path):
    out = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run"))
    state = read_run_state(out)
    assert state["state"] == "finished" and state["steps"] == 4
    assert (out / MARKER).exists() and not (out / ".lock").exists()
    assert read_metrics(out)[-1]["event"] == "run_end"


def test_starting_from_a_model_inside_the_run_folder_never_deletes_it(tiny_model_dir, tmp_path):
    first = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run"))
    weights = sorted(p.name for p in (first / "final").iterdir())
    config = small_run_config(SFTConfig, first / "final", first, overwrite=True)
    with pytest.raises(RunFolderError, match="input"):
        train(config)
    assert sorted(p.name for p in (first / "final").iterdir()) == weights


def test_bad_input_creates_nothing_and_the_corrected_rerun_needs_no_overwrite(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    bad = small_run_config(SFTConfig, tiny_model_dir, out)
    with pytest.raises(ValueError, match="no such file"):
        train(replace(bad, data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="no such model folder"):
        train(replace(bad, model=str(tmp_path / "no_model")))
    assert not out.exists()
    assert read_run_state(train(bad))["state"] == "finished"


def test_a_crash_during_the_final_save_is_never_reported_as_finished(
    tiny_model_dir, tmp_path, monkeypatch
):
    def killed(model, tokenizer, path, card=None):
        (path.parent / ".final.tmp").mkdir()
        raise KeyboardInterrupt  # what a kill looks like from inside the process

    monkeypatch.setattr(run_module, "save_pretrained_atomic", killed)
    config = small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(config)
    out = tmp_path / "run"
    assert read_run_state(out)["state"] == "failed"
    assert not (out / "final").exists()
    assert all(m.get("event") != "run_end" for m in read_metrics(out))
    monkeypatch.undo()
    train(replace(config, overwrite=True))
    assert not (out / ".final.tmp").exists(), "leftovers of the interrupted save are cleaned"
    assert read_run_state(out)["state"] == "finished"


def test_a_non_finite_gradient_stops_the_run_with_the_step_and_strict_json(
    tiny_model_dir, tmp_path, monkeypatch
):
    from demoalign.methods import sft as methods

    real = methods.sft_loss_fn

    def poisoned(pad_id):
        loss_fn, calls = real(pad_id), []

        def wrapped(model, items):
            losses, stats, tokens = loss_fn(model, items)
            calls.append(1)
            return (losses * float("nan") if len(calls) == 3 else losses), stats, tokens

        return wrapped

    monkeypatch.setattr(methods, "sft_loss_fn", poisoned)
    with pytest.raises(NonFiniteError, match="optimiser step 3"):
        train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run"))
    state = read_run_state(tmp_path / "run")
    assert state["state"] == "failed" and "step 3" in state["error"]
    steps = [m for m in read_metrics(tmp_path / "run") if "step" in m and "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta", float("nan")),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("beta", float("inf")),
        ("stages", "4"),
        ("max_grad_norm", -1.0),
    ],
)
def test_meaningless_values_are_refused_before_anything_runs(tiny_model_dir, tmp_path, key, value):
    config = small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "run")
    with pytest.raises(ValueError, match=key):
        train(replace(config, **{key: value}))
    assert not (tmp_path / "run").exists()


def test_zero_epochs_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run", epochs=0)


def test_show_progress_false_silences_the_libraries_bars_too(tiny_model_dir, tmp_path):
    from transformers.utils import logging

    try:
        train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run"))
        assert not logging.is_progress_bar_enabled()
    finally:
        logging.enable_progress_bar()


def test_the_model_path_is_checked_without_a_hub_lookup(tmp_path, monkeypatch):
    from demoalign import models

    asked = []  # the hub ids looked up; the stand-in finds each one there
    monkeypatch.setattr(models, "hub_problem", lambda repo_id: asked.append(repo_id))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="is a file"):
        check_model_path(str(data))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        check_model_path(str(tmp_path / "empty"))
    for local in (str(tmp_path / "gone"), "./gone", "runs/x/final"):
        with pytest.raises(ValueError, match="no such model folder"):
            check_model_path(local)
    assert asked == []
    check_model_path("HuggingFaceTB/SmolLM2-135M")  # a hub id is left to the hub
    assert asked == ["HuggingFaceTB/SmolLM2-135M"]
