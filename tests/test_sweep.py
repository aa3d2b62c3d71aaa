"""demoalign.sweep without training: the run order, the budget, failures, earlier slices, the
engine hook, the arm configs and the paired statistics."""

from __future__ import annotations

import json

import pytest

from demoalign import sweep as sweep_module
from demoalign.config import IRFTConfig, SFTConfig, SPINConfig
from demoalign.eval.stats import paired_t_interval, paired_t_test
from demoalign.sweep import (
    Evaluation,
    Sweep,
    arm_config,
    earlier_slice,
    paired_over_seeds,
    run_sweep,
    summarize,
)


def fake_sweep(tmp_path, **overrides) -> Sweep:
    values = dict(
        arms=["sft", "spin"],
        seeds=[0, 1],
        arm_config=lambda arm, seed, out: (arm, seed, out),
        evaluate=lambda model_dir, seed: {"m": [1.0, 2.0]},
        runs_dir=tmp_path,
    )
    return Sweep(**{**values, **overrides})


def fake_record(arm: str, seed: int, value: float, train_s: float = 1.0) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "stages": 0 if arm == "sft" else 1,
        "steps": 4,
        "generation_s": 0.0,
        "train_s": train_s,
        "eval_s": 0.0,
        "items": {"m": [value]},
    }


def test_runs_go_seed_major_and_skip_what_an_earlier_slice_did(tmp_path, monkeypatch):
    order = []

    def run_one(self, arm, seed):
        order.append((arm, seed))
        return fake_record(arm, seed, 1.0)

    monkeypatch.setattr(Sweep, "run_one", run_one)
    outcome = run_sweep(fake_sweep(tmp_path), earlier=[fake_record("sft", 0, 1.0)])
    assert order == [("spin", 0), ("sft", 1), ("spin", 1)]
    assert [(r["arm"], r["seed"]) for r in outcome.runs] == [("sft", 0), *order]
    assert outcome.status == "finished"


def test_the_budget_stops_before_a_run_that_would_not_end_in_time(tmp_path, monkeypatch):
    monkeypatch.setattr(Sweep, "run_one", lambda self, arm, seed: fake_record(arm, seed, 1.0, 50))
    outcome = run_sweep(fake_sweep(tmp_path, budget_s=10))
    assert [r["arm"] for r in outcome.runs] == ["sft"]  # no estimate before the first run
    assert outcome.skipped == ["spin seed 0", "sft seed 1", "spin seed 1"]
    assert outcome.status.startswith("stopped by the budget (10 s) before spin seed 0")


def test_a_failed_run_raises_unless_the_sweep_keeps_going(tmp_path, monkeypatch):
    def run_one(self, arm, seed):
        if arm == "spin" and seed == 0:
            raise RuntimeError("out of memory (simulated)")
        return fake_record(arm, seed, 1.0)

    monkeypatch.setattr(Sweep, "run_one", run_one)
    with pytest.raises(RuntimeError, match="simulated"):
        run_sweep(fake_sweep(tmp_path))
    seen = []
    outcome = run_sweep(
        fake_sweep(tmp_path, keep_going=True), on_run=lambda o, *_: seen.append(o.error)
    )
    assert outcome.failed == ["spin seed 0: RuntimeError: out of memory (simulated)"]
    assert outcome.status == "finished with failures" and len(outcome.runs) == 3
    assert [e is not None for e in seen] == [False, True, False, False]


def test_run_one_passes_the_engine_to_train_and_keeps_items_and_notes(tmp_path, monkeypatch):
    calls = []

    def train(config, on_stage_end=None, **kwargs):
        calls.append((config, kwargs))
        on_stage_end("model", 1)
        return tmp_path

    monkeypatch.setattr(sweep_module, "train", train)
    engine = object()
    sweep = fake_sweep(
        tmp_path,
        engine=engine,
        evaluate=lambda d, seed: Evaluation({"m": [1.0, 0.25], "p": 0.5}, {"samples": ["a"]}),
        stage_eval=lambda model, seed: {"seed": seed},
        item_decimals=1,
    )
    record = sweep.run_one("spin", 1)
    assert calls == [(("spin", 1, tmp_path / "spin" / "seed1"), {"engine": engine})]
    assert record["means"] == {"m": 0.625, "p": 0.5}  # from the values before rounding
    assert record["items"] == {"m": [1.0, 0.2], "p": [0.5]}
    assert record["samples"] == ["a"] and record["over_stages"] == [{"seed": 1}]
    assert fake_sweep(tmp_path).engine is None  # no engine: train is called as before


def test_arm_configs_share_the_common_values_and_take_their_method_settings(tmp_path):
    common = dict(model="m", data="task:sort", output_dir=str(tmp_path), cpu=True)
    settings = {"sft": {"epochs": 3}, "pairwise": {"sft_weight": 0.0, "beta": 0.2}}
    sft = arm_config("sft", common, settings)
    irft = arm_config("irft_T4@sft1", common, settings)
    spin = arm_config("spin", common, settings)
    assert isinstance(sft, SFTConfig) and sft.epochs == 3
    assert isinstance(irft, IRFTConfig) and irft.stages == 4 and irft.sft_weight == 1.0
    assert isinstance(spin, SPINConfig) and spin.sft_weight == 0.0 and spin.beta == 0.2
    with pytest.raises(ValueError, match="rft"):
        arm_config("rft", common, settings)


def test_summary_and_paired_test_over_seeds():
    runs = [fake_record("sft", s, v) for s, v in enumerate([1.0, 2.0, 4.0])]
    runs += [fake_record("spin", s, v) for s, v in enumerate([2.0, 2.5, 6.0])]
    summary = summarize(runs, ["sft", "spin"])
    assert summary["spin"]["m"]["values"] == [2.0, 2.5, 6.0]
    assert summary["spin"]["m"]["seeds"] == [0, 1, 2]
    assert summary["sft"]["m"]["mean"] == pytest.approx(7 / 3)
    assert summary["sft"]["train_s"]["n_seeds"] == 3
    paired = paired_over_seeds([2.0, 2.5, 6.0], [1.0, 2.0, 4.0])
    assert paired["p_value"] == paired_t_test([2.0, 2.5, 6.0], [1.0, 2.0, 4.0])[1]
    assert {k: paired[k] for k in ("difference", "low", "high", "n")} == paired_t_interval(
        [2.0, 2.5, 6.0], [1.0, 2.0, 4.0]
    )


def test_an_earlier_slice_must_have_measured_the_same_thing(tmp_path):
    path = tmp_path / "results.json"
    earlier = {
        "settings": {"lr": 1.0, "out": "a"},
        "start_model": {"m": 0.5},
        "runs": [fake_record("sft", 0, 1.0)],
        "device": "cpu",
        "wall_s": 3.0,
    }
    path.write_text(json.dumps(earlier))
    kept = earlier_slice(path, {"lr": 1.0, "out": "b"}, {"m": 0.5}, free_keys=("out",))
    assert kept["slices"] == [{"device": "cpu", "runs": 1, "wall_s": 3.0}]
    with pytest.raises(SystemExit, match="other settings .*lr"):
        earlier_slice(path, {"lr": 2.0, "out": "a"}, {"m": 0.5})
    with pytest.raises(SystemExit, match="measures differently"):
        earlier_slice(path, {"lr": 1.0, "out": "a"}, {"m": 0.6})
