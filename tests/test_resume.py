"""Checkpoints and resume: a run interrupted anywhere and resumed with resume=true ends with the
uninterrupted run's parameters, bit for bit (CPU, fp32), and its metrics log has every step
exactly once. Kills are simulated inside the process (KeyboardInterrupt from a patched function
at the chosen point), and once for real (kill -9 of a `python -m demoalign` subprocess)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import small_run_config
from demoalign import SFTConfig, train
from demoalign import checkpoint as checkpoint_module
from demoalign import run as run_module
from demoalign.checkpoint import complete_checkpoints
from demoalign.runio import RunFolderError, read_run_state
from demoalign.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster on a shared CPU, and the same thread count in
    every run (and in the subprocess) keeps the arithmetic identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_REFERENCES: dict = {}


def _final(out: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(out / "final").state_dict()


def _steps(out: Path) -> list[tuple]:
    """(step, loss, grad_norm) of every optimiser-step record, in log order."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def _reference(config, tmp_path_factory):
    """The uninterrupted run of `config` (cached per config): final weights and step records."""
    key = repr(replace(config, output_dir=""))
    if key not in _REFERENCES:
        out = train(replace(config, output_dir=str(tmp_path_factory.mktemp("ref") / "run")))
        _REFERENCES[key] = (_final(out), _steps(out))
    return _REFERENCES[key]


def _kill_at_call(monkeypatch, owner, name: str, n: int, before=None):
    """Make the n-th call of owner.name raise KeyboardInterrupt (what a kill looks like from
    inside); `before(*args)` runs first (e.g. to leave a half-written file)."""
    real, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if before is not None:
                before(*args)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def _half_final(model, tokenizer, path):
    (path.parent / ".final.tmp").mkdir()


def _half_state(path, record):
    path.write_text('{"step": ')  # a torn write inside the temporary checkpoint folder


KILLS = {
    # name: (object, function, which call, what it leaves behind)
    "mid_training": (Trainer, "step", None, None),
    "checkpoint_save": (checkpoint_module, "write_state", None, _half_state),
    "final_save": (run_module, "save_pretrained_atomic", 1, _half_final),
}


def _interrupt_and_resume(config, kill: str, n: int, monkeypatch) -> Path:
    owner, name, default_n, before = KILLS[kill]
    with monkeypatch.context() as patch:
        _kill_at_call(patch, owner, name, default_n or n, before)
        with pytest.raises(KeyboardInterrupt):
            train(config)
    out = Path(config.output_dir)
    assert read_run_state(out)["state"] == "failed"
    assert complete_checkpoints(out), "the interrupted run left a checkpoint"
    train(config)
    assert read_run_state(out)["state"] == "finished"
    assert not (out / ".final.tmp").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    return out


def _assert_same_as_uninterrupted(out: Path, reference) -> None:
    weights, steps = reference
    final = _final(out)
    assert final.keys() == weights.keys()
    assert all(torch.equal(final[k], weights[k]) for k in weights), "parameters differ"
    assert _steps(out) == steps, "the log must hold every step once, with the same values"


SFT_CASES = [("mid_training", 6), ("checkpoint_save", 3), ("final_save", 1)]


@pytest.mark.parametrize("kill,n", SFT_CASES, ids=[c[0] for c in SFT_CASES])
def test_sft_resume_is_bitwise_equal(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, kill, n
):
    config = small_run_config(
        SFTConfig, tiny_model_dir, tmp_path / "run", epochs=2, save_steps=3, resume=True
    )
    out = _interrupt_and_resume(config, kill, n, monkeypatch)
    _assert_same_as_uninterrupted(out, _reference(config, tmp_path_factory))


def test_resume_refuses_another_config_and_a_foreign_folder(tiny_model_dir, tmp_path):
    config = small_run_config(SFTConfig, tiny_model_dir, tmp_path / "run", resume=True)
    with pytest.MonkeyPatch.context() as patch:
        _kill_at_call(patch, Trainer, "step", 3)
        with pytest.raises(KeyboardInterrupt):
            train(replace(config, save_steps=1))
    with pytest.raises(RunFolderError, match="save_steps: 1 there, 0 now"):
        train(config)
    with pytest.raises(RunFolderError, match="learning_rate"):
        train(replace(config, save_steps=1, learning_rate=1e-4))
    # show_progress, overwrite and resume itself may differ
    train(replace(config, save_steps=1, show_progress=True, overwrite=True))
    assert read_run_state(tmp_path / "run")["state"] == "finished"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not a demoalign run folder"):
        train(replace(config, output_dir=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_resume_true_starts_a_new_run_and_keeps_the_last_checkpoints(tiny_model_dir, tmp_path):
    config = small_run_config(
        SFTConfig, tiny_model_dir, tmp_path / "run", save_steps=1, keep_checkpoints=3, resume=True
    )
    out = train(config)
    assert [p.name for p in complete_checkpoints(out)] == ["2", "3", "4"]
    assert train(config) == out  # a finished run: nothing to do, nothing touched
    assert read_run_state(out)["state"] == "finished"
