import json
import math

import pytest

from demoalign.config import DemoConfig, load_config
from demoalign.eval.demo import METRICS, run_demo
from demoalign.eval.stats import paired_t_test


def test_short_demo_writes_every_field(tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'demo'}",
        "seeds=2",
        "arms=sft,spin,irft_T2,rft",
        "hidden_size=32",
        "rft_reward_steps=2",
        "rft_rollouts=2",
        "start_examples=128",
        "start_epochs=1",
        "train_examples=32",
        "eval_prompts=16",
        "stage_eval_prompts=8",
        "max_new_tokens=12",
        "batch_size=8",
    ]
    run_demo(load_config(DemoConfig, None, overrides))
    out = tmp_path / "demo"
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["train_examples"] == 32
    names = [a["name"] for a in results["arms"]]
    assert names == ["sft", "spin", "irft_T2", "rft"]
    sft = results["arms"][0]["metrics"]
    for arm in results["arms"]:
        assert arm["seeds"] == [0, 1]
        for metric in METRICS:
            entry = arm["metrics"][metric]
            values = entry["values"]
            assert len(values) == 2
            assert entry["mean"] == pytest.approx(sum(values) / 2)
            assert entry["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
            if arm["name"] != "sft":
                paired = arm["vs_sft"][metric]
                assert paired["test"].startswith("paired t-test")
                assert paired["p_value"] == paired_t_test(values, sft[metric]["values"])[1]
                diffs = [a - b for a, b in zip(values, sft[metric]["values"])]
                assert paired["difference"] == pytest.approx(sum(diffs) / 2)
                assert paired["low"] <= paired["difference"] <= paired["high"]
        for metric in (
            "task_reward_sampled",
            "task_reward_greedy",
            "pair_win_rate",
            "implicit_reward_accuracy",
        ):
            assert all(0.0 <= v <= 1.0 for v in arm["metrics"][metric]["values"])
    irft = results["arms"][2]
    assert [len(c) for c in irft["over_stages"]] == [2, 2]
    assert set(irft["over_stages"][0][0]) == {"task_reward_sampled", "logp_gap"}
    report = (out / "report.md").read_text()
    for claim in ("(a)", "(b)", "(c)", "(d)"):
        assert claim in report
    assert (out / "task_reward.png").stat().st_size > 1000
    assert (out / "over_stages.png").stat().st_size > 1000
    # Equal budget: every arm made the same number of optimiser steps.
    steps = {}
    for name in names:
        lines = (out / "arms" / name / "seed0" / "metrics.jsonl").read_text().splitlines()
        steps[name] = sum('"step"' in line for line in lines)
    # RFT counts its policy steps (its reward-model steps are logged with phase "reward").
    rft_policy = [
        line
        for line in (out / "arms" / "rft" / "seed0" / "metrics.jsonl").read_text().splitlines()
        if '"step"' in line and '"phase": "policy"' in line
    ]
    steps["rft"] = len(rft_policy)
    assert len(set(steps.values())) == 1, steps
    assert "(d) RFT beats SFT at equal policy steps" in report
    assert "## Paired differences to SFT over seeds" in report


@pytest.mark.parametrize("task", ["sort", "add", "brackets"])
def test_heldout_prompts_are_disjoint_from_every_training_prompt(task):
    """With the default sizes, `add` and `brackets` would draw held-out prompts that the start
    model or the arms trained on (about 15% and 55%); the held-out set skips them."""
    from demoalign.data.sources import HELDOUT_SEED
    from demoalign.data.tasks import get_task, heldout_prompts, task_prompts
    from demoalign.eval.demo import training_prompts

    demo = DemoConfig(task=task)
    train = training_prompts(demo)
    held = heldout_prompts(get_task(task), demo.eval_prompts, HELDOUT_SEED, train)
    assert len(held) == demo.eval_prompts and not set(held) & train
    naive = task_prompts(get_task(task), demo.eval_prompts, HELDOUT_SEED)
    if task == "sort":  # no overlap to remove: the draw, and so the demo's figures, are unchanged
        assert held == naive
    else:
        assert set(naive) & train, "the naive draw overlaps for this task"
