"""Two processes under `accelerate launch` reach the same losses as one process with the same
global batch (gloo on CPU; on 2 cores this is a correctness test, not a speed one)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    command_line,
    launch_processes,
    read_metrics,
    small_rft_values,
    small_run_config,
    small_run_values,
)
from demoalign import IRFTConfig, RFTConfig, SFTConfig, train
from demoalign.checkpoint import latest_checkpoint
from demoalign.config import build_config
from demoalign.runio import write_run_state


def _step_metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"step"' in line]


def _small_args(cls, tiny_model_dir, out):
    """conftest's small run with the global batch of 4 split over the 2 processes."""
    return command_line(small_run_values(cls, tiny_model_dir, out, batch_size=2))


def _launch_two_processes(method, args, port=29517, script="ddp_run.py", env=None, ok=True):
    flags = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    return launch_processes(flags, script, [method, *args], port, env=env, ok=ok)


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model_dir, tmp_path):
    two_irft, two_sft = tmp_path / "irft2", tmp_path / "sft2"
    _launch_two_processes("irft", _small_args(IRFTConfig, tiny_model_dir, two_irft))
    _launch_two_processes("sft", _small_args(SFTConfig, tiny_model_dir, two_sft))
    one_irft = train(small_run_config(IRFTConfig, tiny_model_dir, tmp_path / "irft1", batch_size=4))
    one_sft = train(small_run_config(SFTConfig, tiny_model_dir, tmp_path / "sft1", batch_size=4))

    for one, two in ((one_irft, two_irft), (one_sft, two_sft)):
        a, b = _step_metrics(one), _step_metrics(two)
        assert len(a) == len(b) == 4
        assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-4, abs=1e-5)
        assert [m["grad_norm"] for m in b] == pytest.approx([m["grad_norm"] for m in a], rel=1e-3)
    # Same negatives whatever the number of processes (round-robin, per-batch seeds).
    for stage in ("1", "2"):
        assert (one_irft / "stages" / stage / "negatives.jsonl").read_text().count("\n") == 8
        negs = [
            json.loads(x)["negative"]
            for x in (one_irft / "stages" / stage / "negatives.jsonl").read_text().splitlines()
        ]
        negs2 = [
            json.loads(x)["negative"]
            for x in (two_irft / "stages" / stage / "negatives.jsonl").read_text().splitlines()
        ]
        assert negs == negs2


def _phase(run_dir, phase):
    return [m for m in read_metrics(run_dir) if m.get("phase") == phase]


def _negatives(run_dir, k):
    lines = (Path(run_dir) / "iterations" / k / "negatives.jsonl").read_text().splitlines()
    return [json.loads(line)["negative"] for line in lines]


def _assert_close(a: list[dict], b: list[dict], keys) -> None:
    for key in keys:
        expected = [m[key] for m in a]
        assert [m[key] for m in b] == pytest.approx(expected, rel=1e-4, abs=1e-5), key


def _resume_from_first_iteration(run_dir, args, port):
    """Drop the run's last checkpoint and resume it with 2 processes from iteration 1's end."""
    checkpoint = latest_checkpoint(run_dir)
    assert sorted(p.name for p in checkpoint.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    shutil.rmtree(checkpoint)
    write_run_state(run_dir, "failed", method="rft")
    _launch_two_processes("rft", [*args, "resume=true"], port)


@pytest.mark.slow
def test_rft_two_processes_match_one_process(tiny_model_dir, tmp_path, one_thread):
    """2 processes x batch 2 against 1 x batch 4: the same negatives, rollouts (their rewards, KL
    and lengths), reward steps (with preference pairs) and policy steps, and reward-model
    evaluations; then the 2-process run resumed from its first outer iteration's checkpoint
    repeats the second exactly. Generation batches of 4 rows, so that both processes sample
    negatives and rollouts."""
    settings = dict(generation_batch_size=4, reward_steps=2, policy_steps=2)
    settings.update(preference_data="task:sort:5", preference_weight=0.5)
    two, one = tmp_path / "rft2", tmp_path / "rft1"
    values = small_rft_values(tiny_model_dir, two, batch_size=2, **settings)
    args = command_line(values)
    _launch_two_processes("rft", args, port=29523)
    train(build_config(RFTConfig, small_rft_values(tiny_model_dir, one, **settings)))

    assert [_negatives(two, k) for k in "12"] == [_negatives(one, k) for k in "12"]
    reward_keys = ("loss", "grad_norm", "pair_margin", "preference_margin")
    policy_keys = ("loss", "grad_norm", "reward", "kl", "response_tokens")
    for phase, keys in (("reward", reward_keys), ("policy", policy_keys)):
        a, b = _phase(one, phase), _phase(two, phase)
        assert len(a) == len(b) == 4
        _assert_close(a, b, keys)
    assert read_metrics(two)[0]["processes"] == 2
    evals = [[m for m in read_metrics(r) if m.get("event") == "reward_eval"] for r in (one, two)]
    _assert_close(*evals, ("before_train_margin", "after_train_margin", "after_heldout_margin"))

    steps = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(two) if "loss" in m]
    final = load_file(two / "final" / "model.safetensors")
    _resume_from_first_iteration(two, args, port=29523)
    records = read_metrics(two)
    assert {"event": "resume", "checkpoint": "4"} in records
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in records if "loss" in m] == steps
    again = load_file(two / "final" / "model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in final.items())


@pytest.mark.slow
def test_the_main_process_alone_decides_whether_the_run_folder_may_be_used(
    tiny_model_dir, tmp_path
):
    """Each process sees the folder through its own machine's filesystem: the main process's
    view decides for all, and its refusal reaches every process (none waits for it forever)."""
    run = dict(script="main_decides_run.py", port=29519)
    out = tmp_path / "other_refuses"
    args = _small_args(SFTConfig, tiny_model_dir, out)
    _launch_two_processes("sft", args, **run, env=_refusing(1))
    assert (out / "final" / "config.json").is_file()

    out = tmp_path / "main_refuses"
    result = _launch_two_processes(
        "sft", _small_args(SFTConfig, tiny_model_dir, out), **run, env=_refusing(0), ok=False
    )
    assert result.returncode != 0
    # Process 1, whose own view had no objection, stops with the main process's reason.
    refusal = "RunFolderError: process 0 sees a folder it may not use"
    assert f"[rank1]: demoalign.runio.{refusal}" in result.stderr, result.stderr[-3000:]
    assert not out.exists()


def _refusing(rank: int) -> dict:
    return {"REFUSING_RANK": str(rank)}
