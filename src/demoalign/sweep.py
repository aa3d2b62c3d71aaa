"""Arms × seeds at equal budgets: every arm trains from the same start model on the same data with
the same number of optimiser steps, once per seed; an evaluator turns each trained model into
named metrics; every arm is compared with a baseline arm, paired seed by seed (and item by item
where the evaluator gives per-item values).

Used by `demoalign demo` and the scripts in experiments/. A sweep runs seed-major (every arm of
seed 0, then of seed 1, ...), so a sweep cut short still holds whole seeds.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .config import build_config, parse_arm
from .eval.heldout import free_memory
from .eval.stats import (
    bootstrap_interval,
    mean_std,
    paired_deltas,
    paired_t_interval,
    paired_t_test,
    verdict,
)
from .methods import METHODS
from .run import train
from .runio import atomic_write_text


def arm_config(arm: str, common: dict, settings: dict[str, dict]):
    """The training config of `arm` (sft, spin, irft_T<k>, rft, optionally @sft<w>): `common`
    values, then those of settings[method] (settings["pairwise"] for spin and irft); an irft arm
    gets its stages and an @sft<w> arm its sft_weight."""
    method, stages, weight = parse_arm(arm)
    key = "pairwise" if method in ("spin", "irft") else method
    if key not in settings:
        runs = ", ".join(sorted(settings))
        raise ValueError(f"arm {arm!r}: this sweep has settings for {runs} arms only")
    values = {**common, **settings[key]}
    if weight is not None:
        values["sft_weight"] = weight
    if method == "irft":
        values["stages"] = stages
    return build_config(METHODS[method].config_class, values)


class Evaluator(Protocol):
    """Turns a trained model folder into named metrics: {metric: per-item values (a list) or one
    value (a float)}, or an `Evaluation` that also carries notes. `seed` seeds any sampling, so
    that every arm of a seed is sampled alike."""

    def __call__(self, model_dir: Path, seed: int) -> dict | Evaluation: ...


@dataclass
class Evaluation:
    metrics: dict  # {metric: list of per-item values, or one float}
    notes: dict = field(default_factory=dict)  # kept with the run as they are (e.g. sample texts)


@dataclass
class Sweep:
    """What to train and how to evaluate it. `arm_config(arm, seed, output_dir)` returns the
    training config of one run: giving every arm the same data and optimiser steps is its job
    (each run's steps are recorded, and `unequal_budgets` reports a difference)."""

    arms: list[str]
    seeds: list[int]
    arm_config: Callable[[str, int, Path], object]
    evaluate: Evaluator
    runs_dir: Path  # each run trains in runs_dir/<arm>/seed<seed>
    # Called as stage_eval(model, seed) at the end of every IRFT stage; its points are kept per
    # run as "over_stages" and its time is not counted as training time.
    stage_eval: Callable | None = None
    # A generation engine shared by every run (compiled once), passed as train(..., engine=...).
    engine: object | None = None
    keep_models: bool = True  # False: a run's folder is deleted once it is evaluated
    item_decimals: int | None = None  # per-item values are stored rounded (smaller results)
    budget_s: float = 0.0  # > 0: no run starts that would end later than this after the start
    keep_going: bool = False  # a failed run is recorded and the others go on (else it raises)

    def run_dir(self, arm: str, seed: int) -> Path:
        return Path(self.runs_dir) / arm / f"seed{seed}"

    def plan(self, done: set[tuple[int, str]] = frozenset()) -> list[tuple[int, str]]:
        """(seed, arm) in run order, without those already done."""
        runs = [(seed, arm) for seed in self.seeds for arm in self.arms]
        return [run for run in runs if run not in done]

    def run_one(self, arm: str, seed: int) -> dict:
        """Train one arm for one seed, evaluate its final model: the run's record."""
        run_dir = self.run_dir(arm, seed)
        config = self.arm_config(arm, seed, run_dir)
        curve, stage_s, hook = [], [0.0], None
        if self.stage_eval is not None:

            def hook(model, stage):
                t = time.perf_counter()
                curve.append(self.stage_eval(model, seed))
                stage_s[0] += time.perf_counter() - t

        engine = {} if self.engine is None else {"engine": self.engine}
        t0 = time.perf_counter()
        train(config, hook, **engine)
        train_s = time.perf_counter() - t0 - stage_s[0]  # evaluation over stages is not training
        free_memory()
        t0 = time.perf_counter()
        evaluation = self.evaluate(run_dir / "final", seed)
        eval_s = time.perf_counter() - t0
        record = {"arm": arm, "seed": seed, **run_facts(run_dir, arm), "train_s": train_s}
        if not self.keep_models:
            shutil.rmtree(run_dir, ignore_errors=True)
        free_memory()
        return {**record, "eval_s": eval_s, **self._scores(evaluation, curve)}

    def _scores(self, evaluation, curve: list) -> dict:
        if not isinstance(evaluation, Evaluation):
            evaluation = Evaluation(evaluation)
        items = {m: v if isinstance(v, list) else [v] for m, v in evaluation.metrics.items()}
        means = {m: sum(v) / len(v) for m, v in items.items()}
        if self.item_decimals is not None:
            items = {m: [round(x, self.item_decimals) for x in v] for m, v in items.items()}
        scores = {"means": means, "items": items, **evaluation.notes}
        if self.stage_eval is not None:
            scores["over_stages"] = curve
        return scores


@dataclass
class Outcome:
    """The runs of a sweep so far, and what did not run."""

    runs: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    status: str = "running"
    error: str | None = None  # the traceback of the last attempt when it failed


def run_sweep(sweep: Sweep, earlier: list[dict] = (), on_run: Callable | None = None) -> Outcome:
    """Every (seed, arm) run that `earlier` (records of an earlier slice) lacks, seed-major.
    `on_run(outcome, seed, arm, rest)` is called after each attempt, done or failed."""
    started = time.perf_counter()
    outcome = Outcome(runs=list(earlier))
    plan = sweep.plan({(r["seed"], r["arm"]) for r in earlier})
    for k, (seed, arm) in enumerate(plan):
        estimate = run_estimate(outcome.runs, arm)
        elapsed = time.perf_counter() - started
        if sweep.budget_s and estimate is not None and elapsed + estimate > sweep.budget_s:
            outcome.skipped = [f"{a} seed {s}" for s, a in plan[k:]]
            outcome.status = (
                f"stopped by the budget ({sweep.budget_s:.0f} s) before {arm} seed {seed}"
            )
            return outcome
        outcome.error = None
        try:
            outcome.runs.append(sweep.run_one(arm, seed))
        except Exception as exc:  # one failed run must not cost the others (no retries on GPU)
            if not sweep.keep_going:
                raise
            outcome.failed.append(f"{arm} seed {seed}: {type(exc).__name__}: {exc}")
            outcome.error = traceback.format_exc()
            shutil.rmtree(sweep.run_dir(arm, seed), ignore_errors=True)
            free_memory()
        if on_run is not None:
            on_run(outcome, seed, arm, plan[k + 1 :])
    outcome.status = "finished" if not outcome.failed else "finished with failures"
    return outcome


def run_facts(run_dir: Path, arm: str) -> dict:
    """Stages, optimiser steps, generation seconds and negative statistics of a run, from its
    metrics.jsonl."""
    method, stages, _ = parse_arm(arm)
    facts = {"stages": 0 if method == "sft" else stages, "steps": None, "generation_s": 0.0}
    negatives = []
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        rec = json.loads(line)
        if rec.get("event") == "run_end":
            facts["steps"] = rec.get("steps")
        elif rec.get("event") == "stage_start":
            facts["generation_s"] += rec.get("generation_s", 0.0)
            negatives.append(rec.get("negative_tokens_mean", 0.0))
    facts["negative_tokens_mean"] = sum(negatives) / len(negatives) if negatives else None
    return facts


def unequal_budgets(runs: list[dict]) -> set | None:
    """The distinct optimiser-step counts of the runs when they differ, else None."""
    steps = {r["steps"] for r in runs}
    return steps if len(steps) > 1 else None


def run_estimate(runs: list[dict], arm: str) -> float | None:
    """Seconds the next run of `arm` should take: its earlier runs, else the slowest run so far
    scaled by stages (generation grows with T)."""
    same = [r["train_s"] + r["eval_s"] for r in runs if r["arm"] == arm]
    if same:
        return max(same)
    if not runs:
        return None
    stages = parse_arm(arm)[1] if parse_arm(arm)[0] != "sft" else 0
    slowest = max(runs, key=lambda r: r["train_s"] + r["eval_s"])
    per_stage = max(
        (r["generation_s"] / max(1, r["stages"]) for r in runs if r["stages"]), default=0.0
    )
    extra = max(0, stages - slowest["stages"]) * per_stage
    return slowest["train_s"] + slowest["eval_s"] + extra


def remaining_estimate(runs: list[dict], rest: list[tuple]) -> float:
    return sum(run_estimate(runs, arm) or 0.0 for _, arm in rest)


# ---------------------------------------------------------------- statistics


def by_arm(runs: list[dict], arms: list[str]) -> dict[str, dict[int, dict]]:
    """{arm: {seed: run}}."""
    return {arm: {r["seed"]: r for r in runs if r["arm"] == arm} for arm in arms}


def seed_means(run: dict) -> dict:
    return {m: sum(v) / len(v) for m, v in run["items"].items() if v}


def summarize(runs: list[dict], arms: list[str]) -> dict:
    """{arm: {metric: {values (per seed), seeds, mean, std, n_seeds}}}, training seconds
    ("train_s") included; arms without a run are left out."""
    summary = {}
    for arm, seeds in by_arm(runs, arms).items():
        if not seeds:
            continue
        means = [seed_means(r) for r in seeds.values()]
        columns = {m: [x[m] for x in means] for m in means[0]}
        columns["train_s"] = [r["train_s"] for r in seeds.values()]
        summary[arm] = {m: _spread(values, list(seeds)) for m, values in columns.items()}
    return summary


def _spread(values: list[float], seeds: list[int]) -> dict:
    mean, std = mean_std(values)
    return {"values": values, "seeds": seeds, "mean": mean, "std": std, "n_seeds": len(values)}


def paired_over_seeds(a: list[float], b: list[float]) -> dict:
    """a − b over matched seeds: the paired t-test's p-value and the mean difference with its 95%
    t-interval (difference, low, high, n)."""
    return {"p_value": paired_t_test(a, b)[1], **paired_t_interval(a, b)}


SEED_TEST = "paired t-test over seeds (two-sided)"


def arm_results(runs: list[dict], arms: list[str], metrics: dict, baseline: str = "sft") -> list:
    """Per arm, its per-seed metrics: [{name, seeds, metrics: {m: {values, mean, std}},
    vs_<baseline>: {m: {test, p_value, difference, low, high, n}} (empty for the baseline),
    over_stages (where evaluated)}]. `metrics`: {name in the results: metric of the runs, or
    "train_s" for the training seconds}."""
    summary, runs_by_arm = summarize(runs, arms), by_arm(runs, arms)
    columns = {arm: {m: summary[arm][source] for m, source in metrics.items()} for arm in arms}
    out = []
    for name in arms:
        mine, base = columns[name], columns[baseline]
        paired = {}
        if name != baseline:
            paired = {
                m: {"test": SEED_TEST, **paired_over_seeds(c["values"], base[m]["values"])}
                for m, c in mine.items()
            }
        seeds = runs_by_arm[name]
        arm = {
            "name": name,
            "seeds": list(seeds),
            "metrics": {m: {k: c[k] for k in ("values", "mean", "std")} for m, c in mine.items()},
            f"vs_{baseline}": paired,
        }
        if any("over_stages" in run for run in seeds.values()):
            arm["over_stages"] = [run["over_stages"] for run in seeds.values()]
        out.append(arm)
    return out


def mean_cell(metric: dict) -> str:
    return f"{metric['mean']:.3f} ± {metric['std']:.3f}"


def seed_table(arms: list[dict], metrics: list[str], baseline: str = "sft") -> list[str]:
    """Markdown of `arm_results`: mean ± std over seeds, with the p-value against the baseline."""
    rows = ["| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm in arms:
        paired = arm[f"vs_{baseline}"]
        cells = [
            mean_cell(arm["metrics"][m]) + (f" (p={paired[m]['p_value']:.2g})" if paired else "")
            for m in metrics
        ]
        rows.append(f"| {arm['name']} | " + " | ".join(cells) + " |")
    return rows


def paired_seed_table(arms: list[dict], metrics: list[str], baseline: str = "sft") -> list[str]:
    """Markdown of `arm_results`: arm − baseline per metric over matched seeds, with the 95%
    t-interval of the paired test."""
    rows = ["| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm in (a for a in arms if a[f"vs_{baseline}"]):
        cells = [
            f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            for d in (arm[f"vs_{baseline}"][m] for m in metrics)
        ]
        rows.append(f"| {arm['name']} | " + " | ".join(cells) + " |")
    return rows


def compare(runs_a: dict, runs_b: dict, metric: str, resamples: int) -> dict | None:
    """Arm a − arm b on `metric`: paired over items (pooled over the seeds both have: per item
    the mean over seeds of a − b, with a bootstrap interval over items) and over seeds (paired
    t-test on the per-seed means). runs_x: {seed: run}."""
    seeds = sorted(s for s in runs_a if s in runs_b and metric in runs_a[s]["items"])
    seeds = [s for s in seeds if metric in runs_b[s]["items"]]
    if not seeds:
        return None
    deltas = [paired_deltas(runs_a[s]["items"][metric], runs_b[s]["items"][metric]) for s in seeds]
    per_item = [sum(d) / len(seeds) for d in zip(*deltas)]
    low, high = bootstrap_interval(per_item, n_resamples=resamples, seed=0)
    a = [seed_means(runs_a[s])[metric] for s in seeds]
    b = [seed_means(runs_b[s])[metric] for s in seeds]
    p = t_low = t_high = None
    if len(seeds) >= 2:
        over_seeds = paired_over_seeds(a, b)
        p, t_low, t_high = over_seeds["p_value"], over_seeds["low"], over_seeds["high"]
    return {
        "diff": sum(per_item) / len(per_item),
        "low": low,
        "high": high,
        "n_items": len(per_item),
        "seeds": seeds,
        "p_value": p,
        "t_low": t_low,
        "t_high": t_high,
        "a": a,
        "b": b,
    }


def compare_all(runs: list[dict], arms: list[str], baseline: str, resamples: int) -> dict:
    """{arm: {metric: compare(arm, baseline)}} for every arm but the baseline that has runs."""
    runs_by_arm = by_arm(runs, arms)
    out = {}
    for arm in arms:
        if arm == baseline or not runs_by_arm.get(arm) or not runs_by_arm.get(baseline):
            continue
        metrics = next(iter(runs_by_arm[arm].values()))["items"]
        out[arm] = {
            m: c
            for m in metrics
            if (c := compare(runs_by_arm[arm], runs_by_arm[baseline], m, resamples)) is not None
        }
    return out


def fold_outcome(results: dict, outcome, arms: list[str], resamples: int, started: float) -> None:
    """Fold a sweep's outcome so far (None: nothing run yet) into a results dict that holds the
    slices so far (the last is this one, begun at `started`): runs, failures, skipped runs,
    status, the summary over seeds and every arm against sft (`compare`)."""
    if outcome is not None:
        results.update(runs=outcome.runs, failed=outcome.failed, skipped=outcome.skipped)
        results["status"] = outcome.status
    runs = results["runs"]
    results["summary"] = summarize(runs, arms)
    results["vs_sft"] = compare_all(runs, arms, "sft", resamples)
    earlier = results["slices"][:-1]
    results["slices"][-1]["runs"] = len(runs) - sum(p["runs"] for p in earlier)
    results["slices"][-1]["wall_s"] = time.perf_counter() - started
    results["wall_s"] = sum(piece["wall_s"] for piece in results["slices"])


def verdict_text(runs_a: dict, runs_b: dict, name_a: str, name_b: str, metric: str, higher=True):
    """'a vs b: **yes|no|not significant** (...)' over the seeds both have; `higher`: whether a
    higher value is better."""
    seeds = [s for s in sorted(runs_a) if s in runs_b]
    if len(seeds) < 2:
        return f"{name_a} vs {name_b}: **not tested** (fewer than 2 common seeds)"
    a = [seed_means(runs_a[s])[metric] for s in seeds]
    b = [seed_means(runs_b[s])[metric] for s in seeds]
    sign = 1 if higher else -1
    v, p = verdict([sign * x for x in a], [sign * x for x in b])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if abs(ma - mb) <= 1e-12 * max(1.0, abs(ma)):
        v = "no"  # equal means: a float-rounding surplus must not read as "higher"
    better = "higher" if higher else "lower"
    return f"{name_a} vs {name_b}: **{v}** ({better} is better; {ma:.4f} vs {mb:.4f}, p = {p:.3g})"


# ---------------------------------------------------------------- report


def mean_table(summary: dict, start: dict, metrics: list[str]) -> list[str]:
    """Markdown: the start model's values, then mean ± std over seeds per arm."""
    rows = ["| arm | " + " | ".join(metrics) + " | train s |", "|---" * (len(metrics) + 2) + "|"]
    rows.append(
        "| start | " + " | ".join(f"{start[m]:.4f}" if m in start else "" for m in metrics) + " | |"
    )
    for arm, values in summary.items():
        cells = [
            f"{values[m]['mean']:.4f} ± {values[m]['std']:.4f}" if m in values else ""
            for m in metrics
        ]
        t = values["train_s"]
        rows.append(f"| {arm} (n={t['n_seeds']}) | " + " | ".join(cells) + f" | {t['mean']:.1f} |")
    return rows


def diff_table(comparisons: dict, metrics: list[str]) -> list[str]:
    """Markdown: each `compare` result, arm by arm and metric by metric."""
    rows = [
        "| arm | metric | difference | 95% interval (items) | 95% t-interval (seeds) "
        "| p (seeds) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, by_metric in comparisons.items():
        for m in (m for m in metrics if m in by_metric):
            c = by_metric[m]
            p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
            t = "n/a" if c["t_low"] is None else f"[{c['t_low']:+.4f}, {c['t_high']:+.4f}]"
            rows.append(
                f"| {arm} | {m} | {c['diff']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | "
                f"{t} | {p} | {len(c['seeds'])} |"
            )
    if len(rows) == 2:
        rows.append("| (none yet: needs an sft run and another arm) | | | | | | |")
    return rows


def run_table(runs: list[dict]) -> list[str]:
    """Markdown: one row per run (steps, seconds, negatives), and a warning on unequal budgets."""
    rows = [
        "| arm | seed | optimiser steps | train s | of which generation s | eval s | "
        "negative tokens (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        neg = r["negative_tokens_mean"]
        rows.append(
            f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['train_s']:.1f} | "
            f"{r['generation_s']:.1f} | {r['eval_s']:.1f} | "
            + ("" if neg is None else f"{neg:.1f}")
            + " |"
        )
    steps = unequal_budgets(runs)
    if steps:
        rows += ["", f"WARNING: the arms took different numbers of optimiser steps: {steps}."]
    return rows


def write_outputs(out: Path, results: dict, report: str, indent: int = 1) -> None:
    """results.json and report.md, each replaced whole (a reader never sees half a file)."""
    atomic_write_text(Path(out) / "results.json", json.dumps(results, indent=indent))
    atomic_write_text(Path(out) / "report.md", report)


def command_line() -> str:
    """This process's command line, with the data folder it read."""
    env = f"DEMOALIGN_DATA={shlex.quote(os.environ.get('DEMOALIGN_DATA', ''))}"
    return f"{env} python {' '.join(shlex.quote(a) for a in sys.argv)}"


def device_name(on_gpu: bool) -> str:
    import torch

    if on_gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def earlier_slice(path: str | Path, settings: dict, start: dict, free_keys=()) -> dict:
    """The results.json of an earlier slice of the same sweep (device time may come in slices),
    refused (SystemExit) unless it measured the same thing: the same settings but `free_keys`
    (which say how a slice ran, not what it measured), and the same start-model metrics."""
    earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    differ = sorted(
        key
        for key in set(settings) | set(earlier["settings"])
        if key not in free_keys and settings.get(key) != earlier["settings"].get(key)
    )
    if differ:
        raise SystemExit(
            f"{path}: other settings ({', '.join(differ)}); a slice must repeat the earlier one's"
        )
    if set(start) != set(earlier["start_model"]):
        raise SystemExit(f"{path}: other metrics")
    moved = [m for m in start if abs(start[m] - earlier["start_model"][m]) > 1e-3]
    if moved:
        raise SystemExit(
            f"{path}: the start model measures differently ({', '.join(moved)}): not the same "
            "model, data or items"
        )
    if "slices" not in earlier:  # written before slices were recorded: one slice
        earlier["slices"] = [
            {"device": earlier["device"], "runs": len(earlier["runs"]), "wall_s": earlier["wall_s"]}
        ]
    return earlier


def versions() -> dict:
    """Versions of what the numbers depend on."""
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
    }
