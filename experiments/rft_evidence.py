"""RFT on the built-in sort task, beside continued SFT with the same number of policy optimiser
steps, over seeds. A few minutes of CPU.

    python experiments/rft_evidence.py [OUT] [--seeds 3] [key=value RFT overrides ...]

A tiny model (tokenizer trained on the task's text) is SFT'd into a start policy (as
`demoalign demo` does); from it, per seed: RFT (T outer iterations) and continued SFT on the same
demonstrations with as many optimiser steps as RFT's policy steps. Reported: the ground-truth
reward of SAMPLED generations (temperature 1) on held-out prompts, mean ± std over seeds, and a
paired t-test of RFT vs SFT. Results go to OUT/results.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from demoalign.config import RFTConfig, SFTConfig, build_config, parse_overrides
from demoalign.eval.stats import mean_std, paired_t_test
from demoalign.run import train

COMMON = dict(
    template="plain",
    max_length=64,
    max_prompt_length=32,
    cpu=True,
    show_progress=False,
    overwrite=True,
)


def start_model(out: Path) -> Path:
    from demoalign.data.tasks import task_examples
    from demoalign.tiny import tiny_model, train_tokenizer

    texts = [f"{e.prompt}\n{e.response}" for e in task_examples("sort", 500, seed=0)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    init = out / "start_init"
    tiny_model(tokenizer, hidden_size=64, num_layers=2, seed=0).save_pretrained(init)
    tokenizer.save_pretrained(init)
    config = build_config(
        SFTConfig,
        dict(
            COMMON,
            model=str(init),
            data="task:sort:0",
            max_examples=2000,
            epochs=3,
            learning_rate=3e-3,
            batch_size=16,
            seed=0,
            output_dir=str(out / "start"),
        ),
    )
    return train(config) / "final"


class Evaluator:
    def __init__(self, model_dir: Path, n: int):
        from demoalign.data.tasks import get_task, task_prompts
        from demoalign.encoding import Encoder
        from demoalign.models import load_model_and_tokenizer

        self.task = get_task("sort")
        self.prompts = task_prompts(
            self.task, n, seed=2
        )  # held out: training data use seeds 0 and 1
        _, tokenizer = load_model_and_tokenizer(str(model_dir))
        self.encoder = Encoder(tokenizer, "plain", 64, 32)

    def sampled_reward(self, model_dir: Path, seed: int) -> float:
        from demoalign.eval.metrics import generation_reward, task_sampling
        from demoalign.generation import GenerationEngine
        from demoalign.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(str(model_dir))
        options = task_sampling(24, greedy=False, seed=1000 + seed)
        with GenerationEngine() as engine:
            rewards = generation_reward(
                engine, model, self.encoder, self.task, self.prompts, options
            )
        return sum(rewards) / len(rewards)


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
    start = start_model(out)
    evaluator = Evaluator(start, args.eval_prompts)
    rft_values = dict(
        COMMON,
        model=str(start),
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
    rft_values.update(parse_overrides(args.overrides))
    results = {
        "start": [],
        "rft": [],
        "sft": [],
        "settings": {k: v for k, v in rft_values.items() if k != "model"},
    }
    for seed in range(args.seeds):
        results["start"].append(evaluator.sampled_reward(start, seed))
        rft = build_config(
            RFTConfig, dict(rft_values, seed=seed, output_dir=str(out / f"rft_seed{seed}"))
        )
        results["rft"].append(evaluator.sampled_reward(train(rft) / "final", seed))
        policy_steps = rft.outer_iterations * rft.policy_steps
        # Continued SFT: the same demonstrations, as many optimiser steps of the same batch size.
        sft = build_config(
            SFTConfig,
            dict(
                COMMON,
                model=str(start),
                data="task:sort:1",
                batch_size=rft.batch_size,
                max_examples=policy_steps * rft.batch_size,
                epochs=1,
                learning_rate=1e-3,
                seed=seed,
                output_dir=str(out / f"sft_seed{seed}"),
            ),
        )
        results["sft"].append(evaluator.sampled_reward(train(sft) / "final", seed))
        print(
            f"seed {seed}: start {results['start'][-1]:.3f}  rft {results['rft'][-1]:.3f}  sft "
            f"{results['sft'][-1]:.3f}",
            flush=True,
        )
    results["policy_optimizer_steps"] = policy_steps
    results["wall_s"] = time.perf_counter() - started
    t, pval = (
        paired_t_test(results["rft"], results["sft"])
        if args.seeds > 1
        else (float("nan"), float("nan"))
    )
    results["rft_vs_sft_paired_t"] = {"t": t, "p": pval}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nsampled ground-truth reward on {args.eval_prompts} held-out sort prompts, "
        f"{args.seeds} seeds "
        f"({policy_steps} policy optimiser steps per arm):"
    )
    for arm in ("start", "sft", "rft"):
        m, s = mean_std(results[arm])
        print(f"  {arm:6s} {m:.3f} ± {s:.3f}")
    print(f"  RFT − SFT paired t-test: t = {t:.2f}, p = {pval:.3f}; wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
