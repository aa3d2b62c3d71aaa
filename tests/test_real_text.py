"""experiments/real_text.py: the tiny CPU mode end to end, the budget stop, the paired statistics
and the Dolly split."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import DOLLY, SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "real_text.py"
SMALLEST = [
    "--tiny",
    "--seeds=2",
    "--arms=sft,spin,irft_T2",
    "--train=8",
    "--heldout=6",
    "--gen-prompts=3",
    "--hh-pairs=6",
    "--uf-pairs=6",
    "--max-length=80",
    "--max-prompt-length=40",
    "--max-new-tokens=6",
    "--batch-size=4",
    "--bootstrap=200",
]

needs_data = pytest.mark.skipif(
    not (DOLLY.exists() and (SHARED_DATA / "ultrafeedback_sample").exists()),
    reason="the shared data folder is not here",
)


@pytest.fixture(scope="module")
def real_text():
    spec = importlib.util.spec_from_file_location("real_text", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_text"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["real_text"]


@needs_data
def test_tiny_mode_reports_every_section(real_text, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    results = real_text.main([*SMALLEST, f"--out={out}", f"--work-dir={work}"])
    report = (out / "report.md").read_text(encoding="utf-8")
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))

    assert results["status"] == saved["status"] == "finished"
    assert [(r["arm"], r["seed"]) for r in saved["runs"]] == [
        (arm, seed) for seed in (0, 1) for arm in ("sft", "spin", "irft_T2")
    ]
    # Equal budgets: every arm took the same number of optimiser steps (8 / 4 = 2).
    assert {r["steps"] for r in saved["runs"]} == {2}
    for line in (
        "(a) IRFT beats SFT on `hh_logp_gap`: irft_T2 vs sft: **",
        "(b) T > 1 beats SPIN (T = 1, same loss) on `uf_logp_gap`: irft_T2 vs spin: **",
        "(c) IRFT's implicit-reward accuracy is above SFT's on `hh_implicit_acc`: irft_T2 vs sft",
    ):
        assert line in report
    assert "## Paired differences to SFT" in report
    for arm in ("spin", "irft_T2"):
        for metric in ("hh_implicit_acc", "uf_logp_gap", "dolly_nll", "gen_eos"):
            assert f"| {arm} | {metric} | " in report
            c = saved["vs_sft"][arm][metric]
            assert c["low"] <= c["diff"] <= c["high"] and c["seeds"] == [0, 1]
    assert "Leaderboard: not run" in report
    # The start model is its own reference: every implicit-reward comparison is a tie.
    assert saved["start_model"]["hh_implicit_acc"] == 0.5
    # Model folders are deleted once evaluated; only metrics are kept.
    assert not list(work.rglob("model.safetensors"))[1:]  # the tiny start model alone
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "run.log"]


@needs_data
def test_budget_stops_after_the_first_run_and_keeps_it(real_text, tmp_path):
    out = tmp_path / "out"
    args = [*SMALLEST, "--arms=sft,spin", f"--out={out}", "--budget-s=0.001"]
    results = real_text.main(args)
    assert results["status"].startswith("stopped by the budget")
    assert [r["arm"] for r in results["runs"]] == ["sft"]
    assert results["skipped"] == ["spin seed 0", "sft seed 1", "spin seed 1"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "1 of 4 arm × seed runs finished" in report
    assert "(a) IRFT beats SFT: **not tested**" in report


@needs_data
def test_a_later_slice_runs_only_what_the_earlier_one_lacks(real_text, tmp_path):
    """GPU time comes in slices: a budget stops the first after one run; the second keeps it,
    runs the other three, and reports all four; a slice with other settings is refused."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = [*SMALLEST, "--arms=sft,spin"]
    real_text.main([*base, f"--out={first}", "--budget-s=0.001"])
    kept = json.loads((first / "results.json").read_text(encoding="utf-8"))["runs"]
    assert [(r["arm"], r["seed"]) for r in kept] == [("sft", 0)]

    results = real_text.main(
        [*base, f"--out={second}", f"--continue-from={first / 'results.json'}"]
    )
    assert results["status"] == "finished"
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [
        ("sft", 0),
        ("spin", 0),
        ("sft", 1),
        ("spin", 1),
    ]
    assert results["runs"][0] == kept[0], "the earlier run was run again"
    assert [piece["runs"] for piece in results["slices"]] == [1, 3]
    assert results["vs_sft"]["spin"]["dolly_nll"]["seeds"] == [0, 1]
    assert "over 2 slices" in (second / "report.md").read_text(encoding="utf-8")

    other = [*base, "--lr=0.5", f"--out={tmp_path / 'x'}"]
    with pytest.raises(SystemExit, match="other settings .*lr"):
        real_text.main([*other, f"--continue-from={first / 'results.json'}"])


def _run(arm, seed, values):
    return {"arm": arm, "seed": seed, "train_s": 1.0, "items": {"m": values}}


def test_paired_difference_pools_items_over_seeds():
    from demoalign.sweep import compare

    a = {0: _run("x", 0, [1.0, 2.0, 3.0]), 1: _run("x", 1, [2.0, 1.0, 5.0])}
    b = {0: _run("sft", 0, [0.0, 2.0, 2.0]), 1: _run("sft", 1, [1.0, 1.0, 3.0])}
    c = compare(a, b, "m", resamples=500)
    # per item, the mean over seeds of a - b: (1+1)/2, (0+0)/2, (1+2)/2
    assert c["diff"] == pytest.approx((1.0 + 0.0 + 1.5) / 3)
    assert 0.0 <= c["low"] < c["diff"] < c["high"] <= 1.5
    assert c["a"] == [2.0, pytest.approx(8 / 3)] and c["b"] == [pytest.approx(4 / 3), 5 / 3]
    assert c["p_value"] == pytest.approx(0.1257, abs=1e-4)  # t = 5 with 1 degree of freedom
    same = {0: _run("x", 0, [1.0, 3.0]), 1: _run("x", 1, [2.0, 4.0])}
    base = {0: _run("sft", 0, [0.0, 2.0]), 1: _run("sft", 1, [1.0, 3.0])}
    assert compare(same, base, "m", resamples=100)["p_value"] == 0.0


def test_lower_is_better_metrics_flip_the_verdict(real_text):
    parts = sys.modules["real_text_parts"]  # the script's helper module, imported by it
    low = {s: _run("x", s, [1.0, 1.0]) for s in (0, 1, 2)}
    high = {s: _run("sft", s, [2.0 + s, 2.0]) for s in (0, 1, 2)}
    parts.METRICS["m"] = ("test metric", False)
    try:
        assert "**yes**" in parts.verdict_text(low, high, "x", "sft", "m")
        assert "**no**" in parts.verdict_text(high, low, "sft", "x", "m")
    finally:
        del parts.METRICS["m"]


@needs_data
def test_dolly_split_is_disjoint_and_unwrapped(real_text):
    train, heldout, counts = real_text.split_dolly(200, 100)
    assert len(train) == 200 and len(heldout) == 100
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert not any("### Instruction" in e.prompt or "Below is an" in e.prompt for e in train)
    assert counts == {"records": 1000, "too_long": 0}
    assert real_text.split_dolly(200, 100)[:2] == (train, heldout)  # one fixed split


def test_runs_write_no_checkpoints_unless_asked(real_text, tmp_path, tiny_model_dir):
    """Runs here are never resumed: keep_checkpoints=0 (no optimiser state written at every
    stage end); --checkpoints keeps the package default."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    for flag, expected in (([], 0), (["--checkpoints"], 2)):
        args = real_text.parse_args(["--tiny", "--out", str(tmp_path / "o"), *flag])
        for arm in ("sft", "irft_T2"):
            config = real_text.arm_config(arm, 0, args, data, str(tiny_model_dir), tmp_path, False)
            assert config.keep_checkpoints == expected, (arm, flag)


@pytest.mark.slow
@needs_data
def test_a_gguf_start_model_is_converted_once_and_trained_from(real_text, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from test_gguf import chatml_tokenizer, tiny_model, write_tiny_gguf

    tok = chatml_tokenizer()
    model = tiny_model(tok, hidden_size=64, num_layers=2, seed=3)
    write_tiny_gguf(tmp_path / "m.gguf", model, tok, GGMLQuantizationType.Q4_1)
    out, work = tmp_path / "out", tmp_path / "work"
    args = [a for a in SMALLEST if a not in ("--tiny", "--max-length=80", "--max-prompt-length=40")]
    args += ["--arms=sft,spin", "--max-length=160", "--max-prompt-length=80"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on shared cores: one thread is faster
    try:
        results = real_text.main(
            [*args, f"--model={tmp_path / 'm.gguf'}", f"--out={out}", f"--work-dir={work}"]
        )
    finally:
        torch.set_num_threads(threads)
    assert results["status"] == "finished" and len(results["runs"]) == 4
    assert (work / "start_model" / "config.json").exists()
    assert results["settings"]["lr"] == 1e-6  # the real-model profile, not the tiny one


@needs_data
def test_a_failed_run_is_reported_and_the_others_go_on(real_text, tmp_path, monkeypatch):
    from demoalign.sweep import Sweep

    real_one_run = Sweep.run_one

    def one_run(self, arm, seed):
        if arm == "spin" and seed == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_one_run(self, arm, seed)

    monkeypatch.setattr(Sweep, "run_one", one_run)
    out = tmp_path / "out"
    results = real_text.main([*SMALLEST, "--arms=sft,spin", f"--out={out}"])
    assert results["status"] == "finished with failures"
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("sft", 0), ("sft", 1), ("spin", 1)]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "- FAILED: spin seed 0: RuntimeError: CUDA out of memory (simulated)" in report
    assert "| spin | hh_logp_gap | " in report  # compared on the seed both arms have
