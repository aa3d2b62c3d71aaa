"""experiments/real_text.py's arms, claims and report (its loop and statistics: demoalign.sweep)."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

from demoalign import IRFTConfig, sweep
from demoalign.config import parse_arm
from demoalign.sweep import (
    by_arm,
    diff_table,
    fold_outcome,
    mean_table,
    remaining_estimate,
    run_table,
)

# name: (description, higher is better)
METRICS = {
    "hh_implicit_acc": ("HH pairs: implicit-reward accuracy (ref = start)", True),
    "hh_logp_gap": ("HH pairs: log π(chosen) − log π(rejected)", True),
    "hh_pair_win": ("HH pairs: share with log π(chosen) > log π(rejected)", True),
    "uf_implicit_acc": ("UltraFeedback pairs: implicit-reward accuracy (ref = start)", True),
    "uf_logp_gap": ("UltraFeedback pairs: log π(chosen) − log π(rejected)", True),
    "uf_pair_win": ("UltraFeedback pairs: share with log π(chosen) > log π(rejected)", True),
    "dolly_nll": ("held-out Dolly demonstrations: per-token NLL", False),
    "gen_tokens": ("sampled responses to held-out prompts: mean tokens", None),
    "gen_eos": ("sampled responses to held-out prompts: EOS rate", None),
}


def log(msg: str, out: Path | None = None) -> None:
    print(msg, flush=True)
    if out is not None:
        with open(out / "run.log", "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def log_run(runs: list[dict], rest: list, k: int, started: float, out: Path) -> None:
    """The k-th run of this slice is done: its facts, and the time left for `rest`."""
    run = runs[-1]
    log(
        f"[{k}/{k + len(rest)}] {run['arm']} seed {run['seed']}: {run['steps']} steps, train "
        f"{run['train_s']:.1f} s (generation {run['generation_s']:.1f} s), eval "
        f"{run['eval_s']:.1f} s; elapsed {_fmt_s(time.perf_counter() - started)}, "
        f"ETA {_fmt_s(remaining_estimate(runs, rest))}",
        out,
    )


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def describe(metric: str) -> str:
    if metric in METRICS:
        return METRICS[metric][0]
    return f"leaderboard {metric[3:]} (lm-eval, local files)"


def generation_options(args, on_gpu: bool) -> dict:
    """The generation keys of the IRFT config in this version of the package: `auto` batch size
    and a backend choice exist only where the fast-engine options are present."""
    by_name = {f.name: f for f in fields(IRFTConfig)}
    size = args.generation_batch_size
    if size == "auto" and isinstance(by_name["generation_batch_size"].default, int):
        size = 256 if on_gpu else 16
    opts = {"generation_batch_size": int(size) if str(size).isdigit() else size}
    if "generation_backend" in by_name:
        opts["generation_backend"] = args.generation_backend
    return opts


def arm_config(arm: str, seed: int, args, data_file: Path, model: str, out: Path, on_gpu: bool):
    """One run: every arm the same data, learning rate and optimiser steps."""
    common = dict(
        model=model,
        data=str(data_file),
        output_dir=str(out),
        overwrite=True,
        seed=seed,
        template="auto",
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer="adamw",
        mixed_precision="auto",
        cpu=not on_gpu,
        show_progress=False,
        # Runs here are never resumed: no checkpoints (weights and AdamW state at every stage end).
        keep_checkpoints=2 if args.checkpoints else 0,
    )
    pairwise = {
        "beta": args.beta,
        "loss_type": "sigmoid",
        "sft_weight": 0.0,
        "epochs_per_stage": args.epochs,
        "max_new_tokens": args.max_new_tokens,
        **generation_options(args, on_gpu),
    }
    return sweep.arm_config(arm, common, {"sft": {"epochs": args.epochs}, "pairwise": pairwise})


def verdict_text(runs_a: dict, runs_b: dict, name_a: str, name_b: str, metric: str) -> str:
    higher = METRICS.get(metric, ("", True))[1] is not False
    return sweep.verdict_text(runs_a, runs_b, name_a, name_b, metric, higher)


def claims(runs_by_arm: dict, leaderboard: list[str]) -> list[str]:
    """The paper's claims (a)-(c), each on the metrics this experiment measures."""
    irft = [a for a in runs_by_arm if runs_by_arm[a] and parse_arm(a)[0] == "irft"]
    paper_loss = [a for a in irft if parse_arm(a)[2] is None and parse_arm(a)[1] > 1]
    sft, spin = runs_by_arm.get("sft") or {}, runs_by_arm.get("spin") or {}
    lines = []

    def block(label, arms, base, base_name, metrics):
        if not arms or not base:
            lines.append(f"{label}: **not tested** (arms missing)")
            return
        for m in metrics:
            parts = [verdict_text(runs_by_arm[a], base, a, base_name, m) for a in arms]
            lines.append(f"{label} on `{m}`: " + "; ".join(parts) + ".")

    quality = ["hh_logp_gap", "uf_logp_gap", "dolly_nll"] + [f"lb_{t}" for t in leaderboard]
    block("(a) IRFT beats SFT", irft, sft, "sft", quality)
    block("(b) T > 1 beats SPIN (T = 1, same loss)", paper_loss, spin, "spin", quality)
    acc = ["hh_implicit_acc", "uf_implicit_acc"]
    block("(c) IRFT's implicit-reward accuracy is above SFT's", irft, sft, "sft", acc)
    return lines


def update(results: dict, outcome, arms: list[str], resamples: int, started: float) -> None:
    """Fold the sweep's outcome so far (None: nothing run yet) into `results`, with verdicts."""
    fold_outcome(results, outcome, arms, resamples, started)
    tasks = [m[3:] for m in results["start_model"] if m.startswith("lb_")]
    results["verdicts"] = claims(by_arm(results["runs"], arms), tasks)


def report_text(results: dict) -> str:
    s, d = results["settings"], results["data"]
    names = list(METRICS)
    for run in results["runs"]:
        names += [m for m in run["items"] if m not in names]
    present = [m for m in names if any(m in r["items"] for r in results["runs"])]
    present = present or [m for m in names if m in results["start_model"]]
    lines = [
        "# Real text: the paper's claims on a pretrained chat model",
        "",
        f"Status: **{results['status']}**. Device: {results['device']}. "
        f"Total wall time {results['wall_s']:.0f} s. "
        f"{len(results['runs'])} of {results['planned_runs']} arm × seed runs finished"
        + slices_text(results.get("slices", []))
        + ".",
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Start model: `{s['model']}`. Demonstrations: {s['train']} Dolly responses "
        f"(human-written); held out: {s['heldout']} Dolly demonstrations (NLL; the first "
        f"{s['gen_prompts']} prompts for sampling); both drawn from the "
        f"{d['dolly_records'] - d['dolly_too_long']} of {d['dolly_records']} Dolly records that "
        f"fit the length limits uncut; {d['hh_pairs']} HH helpful-online test pairs, "
        f"{d['uf_pairs']} UltraFeedback pairs. Every arm: lr {s['lr']:g} (AdamW), batch "
        f"{s['batch_size']}, {s['epochs']} epoch(s), β {s['beta']:g}, max_length "
        f"{s['max_length']}, max_prompt_length {s['max_prompt_length']}, max_new_tokens "
        f"{s['max_new_tokens']}; seeds {s['seeds']}.",
        "",
        f"Leaderboard: {results['leaderboard']}.",
        "",
        "## Mean ± std over seeds",
        "",
        *mean_table(results["summary"], results["start_model"], present),
        "",
        "## Paired differences to SFT",
        "",
        "arm − sft. Interval (items): 95% percentile bootstrap over items of the per-item "
        "difference averaged over seeds (seed matched to seed), pooled over seeds: the "
        "uncertainty from the choice of evaluation items. t-interval and p (seeds): paired "
        "Student-t over seeds on the per-seed means (two-sided): the uncertainty from training "
        "randomness.",
        "",
        *diff_table(results["vs_sft"], names),
        "",
        "## The paper's claims, re-tested",
        "",
        "Verdicts: yes = better and p < 0.05 (paired t-test over seeds); no = not better on "
        "average; not significant = better but p ≥ 0.05. Quality is measured here by the "
        "held-out pairs' log-prob gap and the held-out demonstrations' NLL (and leaderboard "
        "tasks when run), not by the paper's leaderboard alone.",
        "",
    ]
    lines += [f"- {line}" for line in results["verdicts"]] or ["- no verdicts yet"]
    lines += ["", "## Runs", "", *run_table(results["runs"])]
    lines += [f"- FAILED: {line}" for line in results["failed"]]
    lines += [f"- not run (budget): {line}" for line in results["skipped"]]
    lines += ["", "## Sampled responses (seed 0, first held-out prompts)", ""]
    first_seed = min((r["seed"] for r in results["runs"]), default=0)
    for run in (r for r in results["runs"] if r["seed"] == first_seed):
        for i, text in enumerate(run["samples"]):
            lines.append(f"- {run['arm']} #{i}: {' '.join(text.split())[:240]!r}")
    lines += ["", "## Metrics", "", *[f"- `{m}`: {describe(m)}" for m in names]]
    return "\n".join(lines) + "\n"


def slices_text(slices: list[dict]) -> str:
    if len(slices) < 2:
        return ""
    parts = [f"{p['runs']} runs in {p['wall_s']:.0f} s on {p['device']}" for p in slices]
    return f", over {len(slices)} slices ({'; '.join(parts)})"
