"""Checkpoints and resume: a run interrupted anywhere and resumed with resume=true ends with the
uninterrupted run's parameters, bit for bit (CPU, fp32), and its metrics log has every step
exactly once. Kills are simulated inside the process (KeyboardInterrupt from a patched function
at the chosen point), and once for real (kill -9 of a `python -m demoalign` subprocess)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import command_line, small_rft_values, small_run_config, small_run_values
from demoalign import IRFTConfig, RFTConfig, SFTConfig, SPINConfig, train
from demoalign import checkpoint as checkpoint_module
from demoalign import run as run_module
from demoalign.checkpoint import complete_checkpoints
from demoalign.cli import main
from demoalign.config import build_config
from demoalign.methods import irft as irft_module
from demoalign.methods import rft as rft_module
from demoalign.runio import RunFolderError, read_run_state
from demoalign.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


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
        _REFERENCES[key] = (_final(out), _steps(out), out)
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
    "between_stages": (irft_module, "_sample_stage", 2, None),
    "between_iterations": (rft_module, "make_negatives", 2, None),
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
    weights, steps, _ = reference
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


# 2 stages x 2 epochs x 2 steps: checkpoints at steps 3, 4 (stage end), 6, 8 (stage end).
IRFT_CASES = [
    ("mid_training", 4),  # resumes inside stage 1 from step 3, with the stored pairs
    ("between_stages", 2),  # killed while sampling stage 2: resumes from the stage-1 boundary
    ("checkpoint_save", 4),  # the save of step 8 torn: resumes inside stage 2 from step 6
    ("final_save", 1),
]


@pytest.mark.parametrize("kill,n", IRFT_CASES, ids=[c[0] for c in IRFT_CASES])
def test_irft_resume_is_bitwise_equal(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, kill, n
):
    config = small_run_config(
        IRFTConfig, tiny_model_dir, tmp_path / "run", epochs_per_stage=2, save_steps=3, resume=True
    )
    out = _interrupt_and_resume(config, kill, n, monkeypatch)
    _assert_same_as_uninterrupted(out, _reference(config, tmp_path_factory))


def test_a_resumed_stage_reuses_its_stored_pairs(tiny_model_dir, tmp_path, monkeypatch):
    config = small_run_config(
        IRFTConfig, tiny_model_dir, tmp_path / "run", epochs_per_stage=2, save_steps=3, resume=True
    )
    with monkeypatch.context() as patch:
        _kill_at_call(patch, Trainer, "step", 4)
        with pytest.raises(KeyboardInterrupt):
            train(config)
    sampled = []
    real = irft_module._sample_stage
    monkeypatch.setattr(irft_module, "_sample_stage", lambda *a: sampled.append(a[4]) or real(*a))
    train(config)
    assert sampled == [2], "stage 1 continued from its checkpoint without sampling again"


@pytest.mark.parametrize("scope", ["run", "stage"])
def test_spin_and_stage_scoped_optimiser_resume_bitwise(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, scope
):
    config = small_run_config(
        SPINConfig,
        tiny_model_dir,
        tmp_path / "run",
        iterations=2,
        save_steps=3,
        optimizer_scope=scope,
        resume=True,
    )
    out = _interrupt_and_resume(config, "mid_training", 8, monkeypatch)  # inside iteration 2
    _assert_same_as_uninterrupted(out, _reference(config, tmp_path_factory))


# 2 outer iterations of 4 reward steps and 2 policy steps: a checkpoint at steps 6 and 12.
RFT_CASES = [
    ("mid_training", 8),  # iteration 2's second reward step: resumes from iteration 1's end
    ("between_iterations", 2),  # killed while sampling iteration 2's negatives
    ("checkpoint_save", 2),  # the save of iteration 2 torn
    ("final_save", 1),
]


@pytest.mark.parametrize("kill,n", RFT_CASES, ids=[c[0] for c in RFT_CASES])
def test_rft_resume_is_bitwise_equal(
    tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, kill, n
):
    values = small_rft_values(tiny_model_dir, tmp_path / "run", resume=True)
    config = build_config(RFTConfig, values)
    out = _interrupt_and_resume(config, kill, n, monkeypatch)
    _assert_same_as_uninterrupted(out, _reference(config, tmp_path_factory))
    reward = "iterations/2/reward_model/model.safetensors"
    reference_reward = load_file(_reference(config, tmp_path_factory)[2] / reward)
    resumed_reward = load_file(out / reward)
    assert all(torch.equal(resumed_reward[k], v) for k, v in reference_reward.items())


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
    # A run begun by an older demoalign has no key for a newer option: its default matches.
    saved = tmp_path / "run" / "config.yaml"
    lines = saved.read_text().splitlines(True)
    older = [line for line in lines if not line.startswith("compile_training:")]
    assert len(older) == len(lines) - 1
    saved.write_text("".join(older))
    assert train(replace(config, save_steps=1)) == tmp_path / "run"
    with pytest.raises(RunFolderError, match="compile_training: 'auto' there, 'true' now"):
        train(replace(config, save_steps=1, compile_training="true"))
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


def test_a_real_kill_9_then_resume_is_bitwise_equal(tiny_model_dir, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    keys = dict(epochs_per_stage=3, save_steps=2, resume=True)
    config = small_run_config(IRFTConfig, tiny_model_dir, out, **keys)
    values = dict(
        model=str(tiny_model_dir),
        data=config.data,
        output_dir=str(out),
        max_examples=16,
        max_length=80,
        max_prompt_length=40,
        batch_size=4,
        learning_rate=1e-3,
        cpu=True,
        show_progress=False,
        max_new_tokens=10,
        generation_batch_size=8,
        stages=2,
        **keys,
    )
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(run_module.__file__).parents[1]),
    }
    proc = subprocess.Popen([sys.executable, "-m", "demoalign", "irft", *args], env=env)
    deadline = time.time() + 120
    while not complete_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert read_run_state(out)["state"] == "running", "a killed run cannot record its end"
    assert not (out / "final").exists()
    train(config)
    _assert_same_as_uninterrupted(out, _reference(config, tmp_path_factory))


def _stage_two_first_step(tiny_model_dir, tmp_path, scope: str) -> tuple[dict, dict]:
    """(weights after stage 2's first step in a run, the same step taken from the stage-1 end
    weights by a fresh optimiser and a fresh schedule)."""
    from demoalign.methods.irft import count_pairs, irft_loss_fn
    from demoalign.pairs import Pair
    from demoalign.runio import MetricsLog
    from demoalign.trainer import make_accelerator, seeded_permutation

    config = small_run_config(
        IRFTConfig,
        tiny_model_dir,
        tmp_path / scope,
        save_steps=1,
        keep_checkpoints=10,
        optimizer_scope=scope,
    )
    out = train(config)  # 2 stages of 2 steps: checkpoint 2 ends stage 1, 3 is stage 2's first
    second = torch.load(out / "checkpoints" / "3" / "policy.pt", weights_only=True)["model"]
    pairs = json.loads((out / "checkpoints" / "3" / "state.json").read_text())["method"]["pairs"]
    pairs = [Pair(**p) for p in pairs]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(torch.load(out / "checkpoints" / "2" / "policy.pt")["model"])
    log = MetricsLog(tmp_path / "unused.jsonl", enabled=False)
    fresh = Trainer(config, model, make_accelerator(config), log)
    fresh.start_schedule(2)
    batch = [pairs[i] for i in seeded_permutation(len(pairs), config.seed, 2, 0)[:4]]
    loss_fn = irft_loss_fn(
        config.beta, config.loss_type, config.sft_weight, model.config.pad_token_id
    )
    fresh.step(batch, loss_fn, count_pairs(batch))
    return second, fresh.unwrapped.state_dict()


def test_optimizer_scope_stage_starts_every_stage_with_a_fresh_optimiser(tiny_model_dir, tmp_path):
    in_run, fresh = _stage_two_first_step(tiny_model_dir, tmp_path, "stage")
    assert all(torch.equal(in_run[k], fresh[k]) for k in fresh)
    in_run, fresh = _stage_two_first_step(tiny_model_dir, tmp_path, "run")
    assert not all(torch.equal(in_run[k], fresh[k]) for k in fresh), "run keeps Adam's moments"


def test_keep_checkpoints_zero_writes_none_and_cannot_resume(tiny_model_dir, tmp_path):
    from dataclasses import replace

    config = small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "run", keep_checkpoints=0)
    out = train(config)
    assert (out / "final").exists() and not (out / "checkpoints").exists()
    with pytest.raises(ValueError, match="keep_checkpoints"):
        train(replace(config, resume=True))


@pytest.mark.parametrize("cls", [SFTConfig, IRFTConfig], ids=["sft", "irft"])
def test_lora_resume_is_bitwise_equal(tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch, cls):
    """With LoRA the checkpoint holds the adapted model and an optimiser over the adapters only;
    a run killed mid-training resumes to the uninterrupted run's merged final/."""
    extra = dict(epochs=2) if cls is SFTConfig else dict(epochs_per_stage=2)
    config = small_run_config(
        cls, tiny_model_dir, tmp_path / "run", save_steps=3, resume=True, lora_r=4, **extra
    )
    out = _interrupt_and_resume(config, "mid_training", 5, monkeypatch)
    _assert_same_as_uninterrupted(out, _reference(config, tmp_path_factory))
    state = torch.load(complete_checkpoints(out)[-1] / "policy.pt", weights_only=True)
    adapters = sum("lora_" in k for k in state["model"])
    assert adapters and len(state["optimizer"]["state"]) == adapters


def test_ctrl_c_in_the_shell_says_how_to_resume_and_a_plain_rerun_points_at_resume(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = ["sft", *command_line(small_run_values(SFTConfig, tiny_model_dir, out, save_steps=1))]
    with monkeypatch.context() as patch:
        _kill_at_call(patch, Trainer, "step", 3)  # checkpoints 1 and 2 are complete
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"interrupted: {out} keeps checkpoint 2; rerun the same command with resume=true" in err
    # the same command again: not "pass overwrite=true", which would delete the checkpoints
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unfinished run with checkpoint 2; pass resume=true" in err
    assert [p.name for p in complete_checkpoints(out)] == ["1", "2"]
    assert main([*argv, "resume=true"]) == 0
    assert read_run_state(out)["state"] == "finished"

    early = tmp_path / "early"
    argv = ["sft", *command_line(small_run_values(SFTConfig, tiny_model_dir, early))]
    with monkeypatch.context() as patch:
        _kill_at_call(patch, Trainer, "step", 1)
        assert main(argv) == 130
    assert f"interrupted before {early} held a checkpoint" in capsys.readouterr().err
