"""`demoalign demo`: the built-in task, re-testing the paper's claims on CPU with error bars.

A tiny model is trained by SFT to a start model; from that same start each arm (continued SFT,
SPIN, IRFT with several T, RFT) trains on the same demonstrations with the same number of
optimiser steps (RFT: policy steps), over several seeds; every arm is evaluated on held-out
prompts and pairs and compared with continued SFT by a paired t-test over seeds. The arms × seeds
loop and its statistics are demoalign.sweep's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from ..config import DemoConfig, SFTConfig, build_config, parse_arm
from ..data.sources import HELDOUT_SEED
from ..data.tasks import get_task, heldout_prompts, task_examples, task_pairs
from ..encoding import Encoder
from ..generation import GenerationEngine
from ..models import load_model_and_tokenizer
from ..progress import progress_bar
from ..run import train
from ..runio import atomic_write_text, claim_output_dir, release_lock
from ..sweep import (
    SEED_TEST,
    Sweep,
    arm_config,
    arm_results,
    mean_cell,
    paired_seed_table,
    run_sweep,
    seed_table,
)
from ..tiny import make_tiny_model
from .metrics import generation_reward, pair_metrics, pair_sequence_logps, task_sampling
from .stats import verdict

SHORT = {
    "task_reward_sampled": "sampled",
    "task_reward_greedy": "greedy",
    "pair_win_rate": "pair win",
    "logp_gap": "logp gap",
    "implicit_reward_accuracy": "implicit acc",
    "wall_time_s": "wall s",
}
METRICS = (
    "task_reward_sampled",
    "task_reward_greedy",
    "pair_win_rate",
    "logp_gap",
    "implicit_reward_accuracy",
    "wall_time_s",
)
TEST_NAME = SEED_TEST


def _arm_config(demo: DemoConfig, arm: str, start: Path, seed: int, out: Path):
    """One arm's run: the same demonstrations and optimiser steps as every other arm."""
    common = dict(
        model=str(start),
        data=f"task:{demo.task}:1",
        max_examples=demo.train_examples,
        output_dir=str(out),
        template="plain",
        max_length=64,
        max_prompt_length=32,
        batch_size=demo.batch_size,
        seed=seed,
        cpu=True,
        show_progress=False,
        overwrite=True,
        keep_checkpoints=0,  # a demo arm is never resumed: no time on checkpoints
    )
    # Equal budget in policy optimiser steps: RFT's policy steps add up to SFT's steps.
    total_steps = demo.epochs * -(-demo.train_examples // demo.batch_size)
    generation = {"max_new_tokens": demo.max_new_tokens, "generation_batch_size": 64}
    settings = {
        "sft": {"epochs": demo.epochs, "learning_rate": demo.sft_learning_rate},
        "rft": {
            "learning_rate": demo.learning_rate,
            "beta": demo.rft_beta,
            "outer_iterations": demo.rft_outer_iterations,
            "policy_steps": max(1, total_steps // demo.rft_outer_iterations),
            "reward_steps": demo.rft_reward_steps,
            "reward_learning_rate": demo.rft_reward_learning_rate,
            "rollouts": demo.rft_rollouts,
            **generation,
        },
        "pairwise": {
            "learning_rate": demo.learning_rate,
            "beta": demo.beta,
            "loss_type": demo.loss_type,
            "sft_weight": demo.sft_weight,
            "epochs_per_stage": demo.epochs,
            **generation,
        },
    }
    return arm_config(arm, common, settings)


def training_prompts(demo: DemoConfig) -> set[str]:
    """Every prompt the start model or an arm trains on (data seeds 0 and 1, as drawn below)."""
    start = task_examples(demo.task, demo.start_examples, seed=0)
    arms = task_examples(demo.task, demo.train_examples, seed=1)
    return {e.prompt for e in start + arms}


class Evaluator:
    """Held-out metrics of a model on the task, with the start model as the implicit reference."""

    def __init__(self, demo: DemoConfig, start_dir: Path):
        self.demo = demo
        self.task = get_task(demo.task)
        self.prompts = heldout_prompts(
            self.task, demo.eval_prompts, HELDOUT_SEED, training_prompts(demo)
        )
        self.pairs = task_pairs(self.task, self.prompts, seed=HELDOUT_SEED)
        model, self.tokenizer = load_model_and_tokenizer(str(start_dir))
        self.encoder = Encoder(self.tokenizer, "plain", 64, 32)
        self.ref_good, self.ref_bad = pair_sequence_logps(model, self.encoder, self.pairs)
        self.engine = GenerationEngine()  # CPU, `auto` = hf: it holds no model between calls

    def stage_point(self, model, n: int, seed: int) -> dict:
        """Sampled reward and held-out log-prob gap on the first n prompts/pairs."""
        sampled = task_sampling(self.demo.max_new_tokens, greedy=False, seed=seed)
        rewards = generation_reward(
            self.engine, model, self.encoder, self.task, self.prompts[:n], sampled
        )
        good, bad = pair_sequence_logps(model, self.encoder, self.pairs[:n])
        return {
            "task_reward_sampled": sum(rewards) / n,
            "logp_gap": sum(g - b for g, b in zip(good, bad)) / n,
        }

    def __call__(self, model_dir: Path, seed: int) -> dict:
        """The held-out metrics of the model in `model_dir` (the sweep's evaluator)."""
        model, _ = load_model_and_tokenizer(str(model_dir))
        return self.metrics(model, seed)

    def metrics(self, model, seed: int) -> dict:
        n = self.demo.max_new_tokens
        args = (self.engine, model, self.encoder, self.task, self.prompts)
        sampled = generation_reward(*args, task_sampling(n, greedy=False, seed=seed))
        greedy = generation_reward(*args, task_sampling(n, greedy=True, seed=seed))
        good, bad = pair_sequence_logps(model, self.encoder, self.pairs)
        return {
            "task_reward_sampled": sum(sampled) / len(sampled),
            "task_reward_greedy": sum(greedy) / len(greedy),
            **pair_metrics(good, bad, self.ref_good, self.ref_bad),
        }


def make_start_model(demo: DemoConfig, out: Path) -> Path:
    """A tiny model (tokenizer trained on the task's text) SFT'd on the task: out/start/final."""
    texts = [f"{e.prompt}\n{e.response}" for e in task_examples(demo.task, 500, seed=0)]
    init = make_tiny_model(
        out / "start_init",
        vocab_size=demo.vocab_size,
        hidden_size=demo.hidden_size,
        num_layers=demo.layers,
        seed=0,
        corpus=texts,
    )
    config = build_config(
        SFTConfig,
        dict(
            model=str(init),
            data=f"task:{demo.task}:0",
            max_examples=demo.start_examples,
            output_dir=str(out / "start"),
            template="plain",
            max_length=64,
            max_prompt_length=32,
            batch_size=demo.batch_size,
            epochs=demo.start_epochs,
            learning_rate=demo.start_learning_rate,
            seed=0,
            cpu=True,
            show_progress=False,
            overwrite=True,
            keep_checkpoints=0,
        ),
    )
    return train(config) / "final"


def run_demo(demo: DemoConfig) -> dict:
    """Validate, take the demo folder (locked while the demo runs), run every arm."""
    demo.validate()
    out = claim_output_dir(demo.output_dir, demo.overwrite)
    try:
        return _run_demo_in(out, demo)
    finally:
        release_lock(out)


def demo_sweep(demo: DemoConfig, start: Path, evaluator: Evaluator, runs_dir: Path) -> Sweep:
    """Every arm × seed from `start`, evaluated on the held-out set, curves over stages on its
    first stage_eval_prompts."""

    def stage_point(model, seed: int) -> dict:
        return evaluator.stage_point(model, demo.stage_eval_prompts, seed=1000 + seed)

    return Sweep(
        arms=demo.arm_list(),
        seeds=list(range(demo.seeds)),
        arm_config=lambda arm, seed, out: _arm_config(demo, arm, start, seed, out),
        evaluate=evaluator,
        runs_dir=runs_dir,
        stage_eval=stage_point,
    )


def _run_demo_in(out: Path, demo: DemoConfig) -> dict:
    atomic_write_text(out / "config.yaml", _yaml({"method": "demo", **asdict(demo)}))
    console = Console()
    started = time.perf_counter()
    console.print(
        f"[bold]demoalign demo[/]: task {demo.task}, arms {demo.arms}, {demo.seeds} seeds -> {out}"
    )
    start = make_start_model(demo, out)
    evaluator = Evaluator(demo, start)
    start_metrics = evaluator(start, seed=0)
    console.print(
        f"start model: sampled reward {start_metrics['task_reward_sampled']:.3f}, "
        f"greedy {start_metrics['task_reward_greedy']:.3f}"
    )
    sweep = demo_sweep(demo, start, evaluator, out / "arms")
    with progress_bar("arms x seeds", total=len(sweep.plan())) as advance:
        outcome = run_sweep(sweep, on_run=lambda *_: advance(1))
    results = _results(demo, outcome.runs, start_metrics)
    _write_report(out, demo, results, time.perf_counter() - started)
    _print_table(console, results)
    console.print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return results


def _results(demo: DemoConfig, runs: list[dict], start_metrics: dict) -> dict:
    """Per arm: every metric's values over seeds with mean ± std, and the paired test against
    continued SFT; the curves over stages."""
    columns = {m: "train_s" if m == "wall_time_s" else m for m in METRICS}
    arms = arm_results(runs, demo.arm_list(), columns, baseline="sft")
    return {"settings": asdict(demo), "start_model": start_metrics, "arms": arms}


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def _claims(results: dict) -> list[str]:
    arms = {a["name"]: a for a in results["arms"]}
    irft = [a for a in arms.values() if parse_arm(a["name"])[0] == "irft"]
    spin = {parse_arm(a)[2]: a for a in arms if a.startswith("spin")}  # by sft_weight override
    lines = []

    def compare(a, b, metric):
        v, p = verdict(a["metrics"][metric]["values"], b["metrics"][metric]["values"])
        mean_a, mean_b = a["metrics"][metric]["mean"], b["metrics"][metric]["mean"]
        return (
            f"{a['name']} vs {b['name']}: **{v}** (mean {mean_a:.3f} vs {mean_b:.3f}, p = {p:.3g})"
        )

    if irft:
        lines.append(
            "(a) IRFT beats SFT at equal budget on the sampled task reward: "
            + "; ".join(compare(a, arms["sft"], "task_reward_sampled") for a in irft)
            + "."
        )
        same_loss = [
            (a, arms[spin[parse_arm(a["name"])[2]]])
            for a in irft
            if parse_arm(a["name"])[1] > 1 and parse_arm(a["name"])[2] in spin
        ]
        if same_loss:
            lines.append(
                "(b) IRFT with T > 1 beats T = 1 (SPIN, same loss) on the sampled task reward: "
                + "; ".join(compare(a, s, "task_reward_sampled") for a, s in same_loss)
                + "."
            )
        lines.append(
            "(c) After IRFT the correct response wins more held-out pairs than after SFT: "
            + "; ".join(compare(a, arms["sft"], "pair_win_rate") for a in irft)
            + "."
        )
    if "rft" in arms:
        lines.append(
            "(d) RFT beats SFT at equal policy steps on the sampled task reward: "
            + compare(arms["rft"], arms["sft"], "task_reward_sampled")
            + "."
        )
    else:
        lines.append("(d) RFT beats SFT: **not tested** (no `rft` arm in this run).")
    return lines


def _paired_table(results: dict) -> str:
    """Arm − SFT per metric over matched seeds, with the 95% t-interval of the paired test."""
    lines = [
        "## Paired differences to SFT over seeds (arm − sft, 95% t-interval)",
        "",
        *paired_seed_table(results["arms"], list(METRICS)),
    ]
    return "\n".join(lines) + "\n"


def _write_report(out: Path, demo: DemoConfig, results: dict, wall: float) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    _plots(out, results)
    table = "\n".join(seed_table(results["arms"], list(METRICS))) + "\n"
    start = results["start_model"]
    text = (
        f"""# demoalign demo: task `{demo.task}`

Every arm starts from the same SFT start model (sampled reward
{start["task_reward_sampled"]:.3f}, greedy {start["task_reward_greedy"]:.3f}) and trains on the
same {demo.train_examples} demonstrations for the same number of optimiser steps. Mean ± std over
{demo.seeds} seeds; p-values: {TEST_NAME} against continued SFT. Metrics on {demo.eval_prompts}
held-out prompts and (correct, plausible wrong) pairs; implicit-reward accuracy uses the start
model as reference. With {demo.seeds} seeds the t-test has {demo.seeds - 1} degrees of freedom:
only large, consistent differences reach p < 0.05, and a difference that is identical in every
seed gives p = 0. Verdicts: yes = higher and p < 0.05; no = not higher; not significant = higher
but p ≥ 0.05. `wall_time_s` is training time only (evaluation excluded).
How the settings were chosen: docs/demo-findings.md. Total wall time {wall:.0f} s.

{table}
{_paired_table(results)}
## The paper's claims, re-tested

"""
        + "\n".join(f"- {line}" for line in _claims(results))
        + f"""

![task reward per arm](task_reward.png)
![reward and log-prob gap over stages](over_stages.png)

## Reproduce

```
demoalign demo output_dir={demo.output_dir} overwrite=true """
        + " ".join(
            f"{k}={v}" for k, v in asdict(demo).items() if k not in ("output_dir", "overwrite")
        )
        + """
```
"""
    )
    atomic_write_text(out / "report.md", text)


def _plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    names = [a["name"] for a in arms]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for k, (metric, label) in enumerate(
        (("task_reward_sampled", "sampled"), ("task_reward_greedy", "greedy"))
    ):
        xs = [i + (k - 0.5) * width for i in range(len(arms))]
        ax.bar(
            xs,
            [a["metrics"][metric]["mean"] for a in arms],
            width,
            yerr=[a["metrics"][metric]["std"] for a in arms],
            capsize=4,
            label=label,
        )
    ax.axhline(
        results["start_model"]["task_reward_sampled"],
        color="gray",
        ls="--",
        lw=1,
        label="start (sampled)",
    )
    ax.set_xticks(range(len(arms)), names)
    ax.set_ylabel("task reward (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "task_reward.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in (
        (axes[0], "task_reward_sampled", "sampled task reward"),
        (axes[1], "logp_gap", "held-out log-prob gap (correct − wrong)"),
    ):
        for arm in arms:
            curves = [c for c in arm["over_stages"] if c]
            if not curves:
                continue
            n = len(curves[0])
            means = [sum(c[i][metric] for c in curves) / len(curves) for i in range(n)]
            ax.plot([(i + 1) / n for i in range(n)], means, marker="o", label=arm["name"])
        ax.axhline(results["start_model"][metric], color="gray", ls="--", lw=1, label="start")
        ax.set_xlabel("fraction of training (end of each stage)")
        ax.set_ylabel(f"{label} (mean over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "over_stages.png", dpi=110)
    plt.close(fig)


def _print_table(console, results: dict) -> None:
    table = Table(title="demo: mean ± std over seeds (p: paired t-test vs sft)")
    table.add_column("arm")
    for m in METRICS:
        table.add_column(SHORT[m])
    for arm in results["arms"]:
        cells = []
        for m in METRICS:
            cell = mean_cell(arm["metrics"][m])
            if arm["vs_sft"]:
                cell += f"\np={arm['vs_sft'][m]['p_value']:.2g}"
            cells.append(cell)
        table.add_row(arm["name"], *cells)
    console.print(table)
    for line in _claims(results):
        console.print(line.replace("**", ""))
