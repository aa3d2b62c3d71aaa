"""RFT on the built-in sort task, beside continued SFT with the same number of policy optimiser
steps, over seeds. A few minutes of CPU.

    python experiments/rft_evidence.py [OUT] [--seeds 3] [key=value RFT overrides ...]

A tiny model (tokenizer trained on the task's text) is SFT'd into a start policy (as
`demoalign demo` does); from it, per seed: RFT (T outer iterations) and continued SFT on the same
demonstrations with as many optimiser steps as RFT's policy steps (demoalign.sweep runs both).
Reported: the ground-truth reward of SAMPLED generations (temperature 1) on held-out prompts, mean
± std over seeds, and a paired t-test of RFT vs SFT. Results go to OUT/results.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from demoalign.config import DemoConfig, RFTConfig, build_config, parse_overrides
from demoalign.eval.demo import make_start_model
from demoalign.eval.stats import mean_std, paired_t_test
from demoalign.sweep import Sweep, arm_config, run_sweep

COMMON = dict(
    template="plain",
    max_length=64,
    max_prompt_length=32,
    cpu=True,
    show_progress=False,
    overwrite=True,
)
RFT = dict(
    data="task:sort:1",
    max_examples=256,
    outer_iterations=2,
    reward_steps=60,
    policy_steps=20,
    rollouts=4,
    batch_size=16,
    beta=0.1,
    learning_rate=3e-4,
    reward_learning_rate=1e-3,
    max_new_tokens=24,
    generation_batch_size=64,
)
RUNS = ("rft", "sft")
# The start policy: the demo's recipe at a smaller size.
START = DemoConfig(
    task="sort",
    vocab_size=300,
    hidden_size=64,
    layers=2,
    start_examples=2000,
    start_epochs=3,
    start_learning_rate=3e-3,
    batch_size=16,
)


class SampledReward:
    """The sweep's evaluator: mean ground-truth reward of sampled responses to held-out prompts."""

    def __init__(self, model_dir: Path, n: int):
        from demoalign.data.tasks import get_task, task_prompts
        from demoalign.encoding import Encoder
        from demoalign.models import load_model_and_tokenizer

        self.task = get_task("sort")
        self.prompts = task_prompts(self.task, n, seed=2)  # held out: training uses seeds 0 and 1
        _, tokenizer = load_model_and_tokenizer(str(model_dir))
        self.encoder = Encoder(tokenizer, "plain", 64, 32)

    def __call__(self, model_dir: Path, seed: int) -> dict:
        from demoalign.eval.metrics import generation_reward, task_sampling
        from demoalign.generation import GenerationEngine
        from demoalign.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(str(model_dir))
        options = task_sampling(24, greedy=False, seed=1000 + seed)
        with GenerationEngine() as engine:
            rewards = generation_reward(
                engine, model, self.encoder, self.task, self.prompts, options
            )
        return {"sampled_reward": sum(rewards) / len(rewards)}


def arm_settings(rft_values: dict) -> dict:
    """RFT as configured; continued SFT on the same demonstrations, with as many optimiser steps
    of the same batch size as RFT's policy steps."""
    rft = build_config(RFTConfig, dict(COMMON, model="x", output_dir="x", **rft_values))
    policy_steps = rft.outer_iterations * rft.policy_steps
    sft = dict(
        data=rft.data,
        batch_size=rft.batch_size,
        max_examples=policy_steps * rft.batch_size,
        epochs=1,
        learning_rate=1e-3,
    )
    return {"rft": rft_values, "sft": sft}, policy_steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="runs/rft_evidence")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("overrides", nargs="*", help="RFT config keys, e.g. beta=0.05 policy_steps=30")
    args = p.parse_intermixed_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    start = make_start_model(START, out)
    evaluate = SampledReward(start, args.eval_prompts)
    rft_values = {**RFT, **parse_overrides(args.overrides)}
    settings, policy_steps = arm_settings(rft_values)
    sweep = Sweep(
        arms=list(RUNS),
        seeds=list(range(args.seeds)),
        arm_config=lambda arm, seed, to: arm_config(
            arm, dict(COMMON, model=str(start), seed=seed, output_dir=str(to)), settings
        ),
        evaluate=evaluate,
        runs_dir=out,
    )
    runs = run_sweep(sweep).runs
    reward = {arm: [r["means"]["sampled_reward"] for r in runs if r["arm"] == arm] for arm in RUNS}
    results = {
        "start": [evaluate(start, seed)["sampled_reward"] for seed in sweep.seeds],
        **reward,
        "settings": dict(COMMON, **rft_values),
        "policy_optimizer_steps": policy_steps,
        "wall_s": time.perf_counter() - started,
    }
    report(results, args, out)


def report(results: dict, args, out: Path) -> None:
    for seed, values in enumerate(zip(results["start"], results["rft"], results["sft"])):
        print(f"seed {seed}: start {values[0]:.3f}  rft {values[1]:.3f}  sft {values[2]:.3f}")
    nan = float("nan")
    t, pval = paired_t_test(results["rft"], results["sft"]) if args.seeds > 1 else (nan, nan)
    results["rft_vs_sft_paired_t"] = {"t": t, "p": pval}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nsampled ground-truth reward on {args.eval_prompts} held-out sort prompts, "
        f"{args.seeds} seeds ({results['policy_optimizer_steps']} policy optimiser steps per arm):"
    )
    for arm in ("start", "sft", "rft"):
        m, s = mean_std(results[arm])
        print(f"  {arm:6s} {m:.3f} ± {s:.3f}")
    print(f"  RFT − SFT paired t-test: t = {t:.2f}, p = {pval:.3f}; wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
