"""The paper's claims re-tested on a real chat model with real human-written demonstrations.

    DEMOALIGN_DATA=/path/to/data python experiments/real_text.py --model MODEL_DIR --out OUT
    DEMOALIGN_DATA=/path/to/data python experiments/real_text.py --tiny --out OUT   # CPU trial

Start model: `--model`, a Hugging Face folder (made for SmolLM2-135M-Instruct from its GGUF; its
chat template is used, `template=auto`). `--tiny` uses a tiny random model instead (a CPU check
of the whole pipeline in under 3 minutes: its numbers mean nothing).

Demonstrations: the Dolly responses of $DEMOALIGN_DATA/dolly_hhrlhf/dolly_hhrlhf_train_small.jsonl
(1000 databricks-dolly-15k records in an Alpaca wrapper, which is stripped so that the chat
template renders the bare instruction). Why Dolly:
- its responses were written by people (Databricks employees), which is what the paper's
  "human demonstrations" are; HH-RLHF "chosen" responses were written by a model and only
  ranked by people, so they serve here as evaluation pairs, not as demonstrations;
- SmolLM2's instruct recipe used UltraFeedback for its preference step, so UltraFeedback
  responses are not new to the start model: they are never used as demonstrations, only as
  evaluation pairs (held out from our training, not from the start model's);
- Dolly is not known to be in SmolLM2-Instruct's tuning data.
One fixed shuffle (data seed 0, the same for every arm and seed) splits the file into the
training demonstrations and disjoint held-out ones (no held-out prompt equals a training prompt),
among the records that fit the length limits uncut: a prompt cut from the left would lose its
instruction (Dolly puts the context passage after it), a response cut short its EOS.

Arms, all from the same start on the same demonstrations with the same number of optimiser steps
(batch × steps = demonstrations × epochs): continued SFT, SPIN (IRFT with T = 1), IRFT T = 4 and
T = 8 (the paper's loss), IRFT T = 4 with sft_weight = 1. Every arm uses the same learning rate
(default 1e-6, AdamW, linear decay after 10% warm-up): the paper's scale (5e-7 on 7B models);
1e-6 rather than 5e-7 so that 32 steps move a 135M model measurably. Each seed changes the data
order, the stage chunks and the sampling of negatives; seeds run seed-major (every arm of seed 0,
then of seed 1, …), so a run cut short still has whole seeds.

Metrics of every arm × seed (per item, so that each comparison is paired over the same items):
- HH (helpful-online test) and UltraFeedback pairs, none used in training: implicit-reward
  accuracy (reference = the start model), log-prob gap log π(chosen) − log π(rejected), and the
  reference-free pair win rate;
- per-token NLL of held-out Dolly demonstrations (mean over items of each item's per-token NLL);
- mean length (tokens) and EOS rate of one sampled response (temperature 1) per held-out Dolly
  prompt, with the same sampling seed for every arm of a seed;
- `--leaderboard TASKS`: lm-evaluation-harness tasks on the local files, through the package's
  leaderboard bridge (the code `demoalign eval leaderboard=...` runs), where lm-eval is installed.
Log-probs are computed in float32 without autocast: the changes at this learning rate are
small, and bf16 rounding (about 0.1 nat per sequence) would drown them.

Statistics: each arm against SFT, per metric, (1) the mean paired difference over items, pooled
over seeds (per item the mean over seeds of arm − SFT, seed matched to seed), with a percentile
bootstrap interval over items; (2) a paired t-test over seeds on the per-seed means (two-sided;
with 3 seeds it has 2 degrees of freedom). Verdicts as `demoalign demo` gives them: yes (higher,
p < 0.05), no (not higher), not significant.

Outputs in --out: results.json and report.md, rewritten after every arm × seed (a killed run
leaves its partial results), and run.log. Model folders live in --work-dir (default: a
temporary folder, removed at the end) and each arm's final/ is deleted after its evaluation.
`--budget-s S` stops starting new runs when the next one would not finish within S seconds of
the start, and reports what finished. `--continue-from RESULTS_JSON` (an earlier slice's
results.json, same settings) keeps its runs and runs only the arm × seed runs it lacks, so a
grid too long for one GPU slice accumulates over several; the report lists the slices.

Generation uses `generation_backend=hf` by default. The compiled static engine
(`--generation-backend auto`) used to compile once per trained model (once per arm × seed here),
which cost more than it saved for a 135M model and 128 new tokens; the sweep now keeps one
GenerationEngine for all its runs and evaluations (each run and each evaluated model finished on
it), so the bf16 copy and compiled step pass from one model to the next of the same architecture
and it compiles once per batch shape for the whole sweep. Which is faster here has not been
measured yet. Checkpoints for resume are not written (`--checkpoints` keeps them):
no run here is resumed, and each would hold 1.6 GB of weights and AdamW state.

Expected wall time with the defaults on one H200 (or H100), about 4.5 to 6 minutes: per seed 22
generate calls of at most 128 decode steps (17 for the negatives: SPIN 1, T = 4 4, T = 8 8,
T = 4 + SFT 4; 5 for the sampled responses), at 13 to 20 ms a step for this 30-layer model with
`hf` (the old default took 53 s for 256 prompts × 256 tokens in batches of 16), so 40 to 60 s;
160 training steps of 8 examples or pairs, about 15 s; float32 log-probs of about 350k tokens
per model, 2 to 4 s × 5; loading and saving each arm's model, about 3 s × 5. That is 80 to 110 s
per seed, 3 seeds, plus about 30 s of start-up and the start model's evaluation. `--budget-s`
guards the rest; the log prints an ETA after every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from demoalign import IRFTConfig, SFTConfig, SPINConfig, train
from demoalign.config import build_config, parse_arm
from demoalign.data import Example, load_preference_pairs
from demoalign.data.sources import data_root
from demoalign.encoding import Encoder, collate
from demoalign.eval.metrics import pair_sequence_logps, pair_values
from demoalign.eval.stats import (
    bootstrap_interval,
    mean_std,
    paired_deltas,
    paired_t_interval,
    paired_t_test,
    verdict,
)
from demoalign.generation import QUIET, GenerationEngine, SamplingOptions, generate_ids
from demoalign.logprobs import model_sequence_logps
from demoalign.models import eval_mode, load_model_and_tokenizer
from demoalign.templates import resolve_template

DOLLY = "dolly_hhrlhf/dolly_hhrlhf_train_small.jsonl"
HH = "hh_rlhf/helpful-online/test.jsonl.gz"
UF = "ultrafeedback_sample/train_clean.jsonl"
ARMS = "sft,spin,irft_T4,irft_T8,irft_T4@sft1"
DATA_SEED = 0

# Sizes for the GPU (SmolLM2-135M) and for the CPU trial; any flag given overrides them.
PROFILES = {
    "gpu": dict(
        seeds=3,
        train=256,
        heldout=128,
        gen_prompts=128,
        hh_pairs=256,
        uf_pairs=256,
        max_length=384,
        max_prompt_length=128,
        max_new_tokens=128,
        batch_size=8,
        lr=1e-6,
        eval_batch_size=32,
    ),
    "tiny": dict(
        seeds=3,
        train=32,
        heldout=24,
        gen_prompts=16,
        hh_pairs=24,
        uf_pairs=24,
        max_length=96,
        max_prompt_length=48,
        max_new_tokens=16,
        batch_size=4,
        lr=1e-3,  # a random tiny model needs a large step to move at all
        eval_batch_size=16,
    ),
}

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
PAIR_KEYS = {
    "implicit_acc": "implicit_reward_accuracy",
    "logp_gap": "logp_gap",
    "pair_win": "pair_win_rate",
}


def log(msg: str, out: Path | None = None) -> None:
    print(msg, flush=True)
    if out is not None:
        with open(out / "run.log", "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- data


_ALPACA = re.compile(r"### Instruction:\n(?P<body>.*)\n\n### Response:\n?$", re.S)


def dolly_examples() -> list[Example]:
    """Dolly records with the Alpaca wrapper stripped: a chat model should see the bare request."""
    out = []
    path = data_root() / DOLLY
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        match = _ALPACA.search(rec["prompt"])
        prompt = (match.group("body") if match else rec["prompt"]).strip()
        if prompt and rec["response"].strip():
            out.append(Example(prompt, rec["response"].strip()))
    return out


def split_dolly(n_train: int, n_heldout: int, fits=None) -> tuple[list, list, dict]:
    """(training, held-out, counts): one fixed shuffle, records that fit the length limits only
    (a demonstration cut short would lose its EOS, a prompt cut from the left its instruction),
    no held-out prompt equal to a training prompt."""
    examples = dolly_examples()
    random.Random(DATA_SEED).shuffle(examples)
    usable = [ex for ex in examples if fits is None or fits(ex)]
    train_part, heldout, seen = [], [], set()
    for ex in usable:
        if len(train_part) < n_train:
            if ex.prompt not in seen:
                train_part.append(ex)
                seen.add(ex.prompt)
        elif ex.prompt not in seen and len(heldout) < n_heldout:
            heldout.append(ex)
    if len(train_part) < n_train or len(heldout) < n_heldout:
        raise ValueError(
            f"{DOLLY}: {len(usable)} of {len(examples)} records fit the length limits: too few "
            f"for {n_train} training and {n_heldout} held-out demonstrations"
        )
    counts = {"records": len(examples), "too_long": len(examples) - len(usable)}
    return train_part, heldout, counts


def length_filter(model: str, max_length: int, max_prompt_length: int):
    """Whether an example fits, uncut, in the limits the runs use (the model's own rendering)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = resolve_template(tokenizer, "auto")
    whole = Encoder(tokenizer, template, 10**9, 10**9 - 1)

    def fits(ex: Example) -> bool:
        prompt = len(whole.prompt_ids(ex))
        return prompt <= max_prompt_length and prompt + len(whole.response_ids(ex.response)) <= (
            max_length
        )

    return fits


def eval_pairs(rel: str, n: int) -> list[tuple]:
    """(prompt Example, chosen, rejected), the first n of the file, sorted by length so that
    batches hold similar lengths (the per-item values do not depend on the order)."""
    pairs = load_preference_pairs(data_root() / rel, limit=n)
    triples = [(ex, ex.response, rejected) for ex, rejected in pairs]
    return sorted(triples, key=lambda t: len(t[0].prompt) + len(t[1]) + len(t[2]))


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n")


# ---------------------------------------------------------------- evaluation


@dataclass
class Evaluator:
    """Per-item metrics of a model; the start model's log-probs are the implicit reference."""

    heldout: list[Example]
    hh: list[tuple]
    uf: list[tuple]
    args: argparse.Namespace
    device: torch.device
    engine: GenerationEngine  # the sweep's: every run trains and is evaluated through it
    leaderboard: list[str] = field(default_factory=list)
    ref: dict = field(default_factory=dict)

    def encoder(self, tokenizer) -> Encoder:
        template = resolve_template(tokenizer, "auto")
        return Encoder(tokenizer, template, self.args.max_length, self.args.max_prompt_length)

    def logps(self, model, tokenizer) -> dict:
        bs = self.args.eval_batch_size
        enc = self.encoder(tokenizer)
        out = {
            "hh": pair_sequence_logps(model, enc, self.hh, bs, fit=True),
            "uf": pair_sequence_logps(model, enc, self.uf, bs, fit=True),
        }
        out["dolly"] = self.demo_logps(model, tokenizer)
        return out

    @torch.no_grad()
    def demo_logps(self, model, tokenizer) -> tuple[list[float], list[int]]:
        enc = self.encoder(tokenizer)
        items = [enc.encode(ex) for ex in self.heldout]
        order = sorted(range(len(items)), key=lambda i: len(items[i].response_ids))
        sums, counts = [0.0] * len(items), [0] * len(items)
        device = next(model.parameters()).device
        with eval_mode(model):
            for start in range(0, len(order), self.args.eval_batch_size):
                idx = order[start : start + self.args.eval_batch_size]
                batch = collate([items[i] for i in idx], tokenizer.pad_token_id)
                lp, n = model_sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
                for i, a, b in zip(idx, lp.tolist(), n.tolist()):
                    sums[i], counts[i] = a, b
        return sums, counts

    def samples(self, model, tokenizer, seed: int) -> tuple[list[int], list[int], list[str]]:
        enc = self.encoder(tokenizer)
        prompts = self.heldout[: self.args.gen_prompts]
        ids = [enc.prompt_ids(ex) for ex in prompts]
        options = SamplingOptions(self.args.max_new_tokens, batch_size=len(ids), seed=seed)
        out = generate_ids(self.engine, model, tokenizer, ids, options, QUIET)
        eos = tokenizer.eos_token_id
        lengths = [len(out[i]) for i in range(len(ids))]
        finished = [int(bool(out[i]) and out[i][-1] == eos) for i in range(len(ids))]
        texts = [
            tokenizer.decode(out[i], skip_special_tokens=True) for i in range(min(2, len(ids)))
        ]
        return lengths, finished, texts

    def items(self, model, tokenizer, gen_seed: int) -> tuple[dict, list[str]]:
        """{metric: per-item values} and two sampled responses (for the report)."""
        lp = self.logps(model, tokenizer)
        if not self.ref:
            self.ref = lp  # the first model evaluated is the start model
        values = {}
        for name in ("hh", "uf"):
            good, bad = lp[name]
            per = pair_values(good, bad, *self.ref[name])
            for short, key in PAIR_KEYS.items():
                values[f"{name}_{short}"] = per[key]
        sums, counts = lp["dolly"]
        values["dolly_nll"] = [-s / max(1, n) for s, n in zip(sums, counts)]
        lengths, finished, texts = self.samples(model, tokenizer, gen_seed)
        values["gen_tokens"] = [float(v) for v in lengths]
        values["gen_eos"] = [float(v) for v in finished]
        if self.leaderboard:
            from demoalign.eval.leaderboard import run_leaderboard

            board = run_leaderboard(
                model,
                tokenizer,
                self.leaderboard,
                root=data_root(),
                limit=self.args.leaderboard_limit or None,
                mmlu_shots=4,
                batch_size=self.args.eval_batch_size,
                seed=0,
                device=self.device,
            )
            for task, r in board.items():
                values[f"lb_{task}"] = [float(v) for v in r["values"]]
        return values, texts

    def evaluate(self, path: Path, gen_seed: int) -> tuple[dict, list[str]]:
        model, tokenizer = load_model_and_tokenizer(str(path))
        model.to(self.device)
        try:
            with self.engine.for_model(model):
                return self.items(model, tokenizer, gen_seed)
        finally:
            del model
            free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- training


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
    method, stages, weight = parse_arm(arm)
    if method == "sft":
        return build_config(SFTConfig, {**common, "epochs": args.epochs})
    pairwise = {
        **common,
        "beta": args.beta,
        "loss_type": "sigmoid",
        "sft_weight": 0.0 if weight is None else weight,
        "epochs_per_stage": args.epochs,
        "max_new_tokens": args.max_new_tokens,
        **generation_options(args, on_gpu),
    }
    if method == "spin":
        return build_config(SPINConfig, pairwise)
    if method == "irft":
        return build_config(IRFTConfig, {**pairwise, "stages": stages})
    raise ValueError(f"arm {arm!r}: this experiment runs sft, spin and irft_T<k> arms")


def run_facts(run_dir: Path) -> dict:
    """Optimiser steps, generation seconds and negative statistics from the run's metrics.jsonl."""
    facts = {"steps": None, "generation_s": 0.0, "negative_tokens_mean": None}
    negatives = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        rec = json.loads(line)
        if rec.get("event") == "run_end":
            facts["steps"] = rec.get("steps")
        elif rec.get("event") == "stage_start":
            facts["generation_s"] += rec.get("generation_s", 0.0)
            negatives.append(rec.get("negative_tokens_mean", 0.0))
    if negatives:
        facts["negative_tokens_mean"] = sum(negatives) / len(negatives)
    return facts


# ---------------------------------------------------------------- statistics


def seed_means(run: dict) -> dict:
    return {m: sum(v) / len(v) for m, v in run["items"].items() if v}


def compare(runs_a: dict, runs_b: dict, metric: str, resamples: int) -> dict | None:
    """Arm a − arm b on `metric`: paired over items (pooled over the seeds both have) and over
    seeds. runs_x: {seed: run}."""
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
        p = paired_t_test(a, b)[1]
        interval = paired_t_interval(a, b)
        t_low, t_high = interval["low"], interval["high"]
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


def summarize_runs(runs: list[dict], arms: list[str], resamples: int) -> tuple[dict, dict]:
    by_arm = {arm: {r["seed"]: r for r in runs if r["arm"] == arm} for arm in arms}
    summary = {}
    for arm, seeds in by_arm.items():
        if not seeds:
            continue
        means = [seed_means(r) for r in seeds.values()]
        summary[arm] = {}
        for m in means[0]:
            mean, std = mean_std([x[m] for x in means])
            summary[arm][m] = {"mean": mean, "std": std, "n_seeds": len(means)}
        walls = [r["train_s"] for r in seeds.values()]
        mean, std = mean_std(walls)
        summary[arm]["train_s"] = {"mean": mean, "std": std, "n_seeds": len(walls)}
    vs_sft = {}
    for arm in arms:
        if arm == "sft" or not by_arm.get(arm) or not by_arm.get("sft"):
            continue
        metrics = next(iter(by_arm[arm].values()))["items"]
        vs_sft[arm] = {
            m: c
            for m in metrics
            if (c := compare(by_arm[arm], by_arm["sft"], m, resamples)) is not None
        }
    return summary, {"vs_sft": vs_sft, "by_arm": by_arm}


def verdict_text(runs_a: dict, runs_b: dict, name_a: str, name_b: str, metric: str) -> str:
    higher = METRICS.get(metric, ("", True))[1] is not False
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


def claims(by_arm: dict, leaderboard: list[str]) -> list[str]:
    """The paper's claims (a)-(c), each on the metrics this experiment measures."""
    irft = [a for a in by_arm if by_arm[a] and parse_arm(a)[0] == "irft"]
    paper_loss = [a for a in irft if parse_arm(a)[2] is None and parse_arm(a)[1] > 1]
    sft, spin = by_arm.get("sft") or {}, by_arm.get("spin") or {}
    lines = []

    def block(label, arms, base, base_name, metrics):
        if not arms or not base:
            lines.append(f"{label}: **not tested** (arms missing)")
            return
        for m in metrics:
            parts = [verdict_text(by_arm[a], base, a, base_name, m) for a in arms]
            lines.append(f"{label} on `{m}`: " + "; ".join(parts) + ".")

    quality = ["hh_logp_gap", "uf_logp_gap", "dolly_nll"] + [f"lb_{t}" for t in leaderboard]
    block("(a) IRFT beats SFT", irft, sft, "sft", quality)
    block("(b) T > 1 beats SPIN (T = 1, same loss)", paper_loss, spin, "spin", quality)
    block(
        "(c) IRFT's implicit-reward accuracy is above SFT's",
        irft,
        sft,
        "sft",
        ["hh_implicit_acc", "uf_implicit_acc"],
    )
    return lines


# ---------------------------------------------------------------- report


def metric_names(results: dict) -> list[str]:
    names = list(METRICS)
    for run in results["runs"]:
        names += [m for m in run["items"] if m not in names]
    return names


def describe(metric: str) -> str:
    if metric in METRICS:
        return METRICS[metric][0]
    return f"leaderboard {metric[3:]} (lm-eval, local files)"


def report_text(results: dict) -> str:
    s = results["settings"]
    names = metric_names(results)
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
        f"{results['data']['dolly_records'] - results['data']['dolly_too_long']} of "
        f"{results['data']['dolly_records']} Dolly records that fit the length limits uncut; "
        f"{results['data']['hh_pairs']} HH "
        f"helpful-online test pairs, {results['data']['uf_pairs']} UltraFeedback pairs. "
        f"Every arm: lr {s['lr']:g} (AdamW), batch {s['batch_size']}, {s['epochs']} epoch(s), "
        f"β {s['beta']:g}, max_length {s['max_length']}, max_prompt_length "
        f"{s['max_prompt_length']}, max_new_tokens {s['max_new_tokens']}; seeds {s['seeds']}.",
        "",
        f"Leaderboard: {results['leaderboard']}.",
        "",
        "## Mean ± std over seeds",
        "",
    ]
    lines += mean_table(results, names)
    lines += ["", "## Paired differences to SFT", ""]
    lines += [
        "arm − sft. Interval (items): 95% percentile bootstrap over items of the per-item "
        "difference averaged over seeds (seed matched to seed), pooled over seeds: the "
        "uncertainty from the choice of evaluation items. t-interval and p (seeds): paired "
        "Student-t over seeds on the per-seed means (two-sided): the uncertainty from training "
        "randomness.",
        "",
    ]
    lines += diff_table(results, names)
    lines += ["", "## The paper's claims, re-tested", ""]
    lines += [
        "Verdicts: yes = better and p < 0.05 (paired t-test over seeds); no = not better on "
        "average; not significant = better but p ≥ 0.05. Quality is measured here by the "
        "held-out pairs' log-prob gap and the held-out demonstrations' NLL (and leaderboard "
        "tasks when run), not by the paper's leaderboard alone.",
        "",
    ]
    lines += [f"- {line}" for line in results["verdicts"]] or ["- no verdicts yet"]
    lines += ["", "## Runs", ""]
    lines += run_table(results)
    lines += [f"- FAILED: {line}" for line in results["failed"]]
    lines += [f"- not run (budget): {line}" for line in results["skipped"]]
    lines += ["", "## Sampled responses (seed 0, first held-out prompts)", ""]
    for run in results["runs"]:
        if run["seed"] == min(r["seed"] for r in results["runs"]):
            for i, text in enumerate(run["samples"]):
                short = " ".join(text.split())[:240]
                lines.append(f"- {run['arm']} #{i}: {short!r}")
    lines += ["", "## Metrics", ""]
    lines += [f"- `{m}`: {describe(m)}" for m in names]
    return "\n".join(lines) + "\n"


def slices_text(slices: list[dict]) -> str:
    if len(slices) < 2:
        return ""
    parts = [f"{p['runs']} runs in {p['wall_s']:.0f} s on {p['device']}" for p in slices]
    return f", over {len(slices)} slices ({'; '.join(parts)})"


def mean_table(results: dict, names: list[str]) -> list[str]:
    present = [m for m in names if any(m in r["items"] for r in results["runs"])]
    present = present or [m for m in names if m in results["start_model"]]
    rows = ["| arm | " + " | ".join(present) + " | train s |"]
    rows.append("|---" * (len(present) + 2) + "|")
    start = results["start_model"]
    rows.append(
        "| start | " + " | ".join(f"{start[m]:.4f}" if m in start else "" for m in present) + " | |"
    )
    for arm, metrics in results["summary"].items():
        cells = [
            f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" if m in metrics else ""
            for m in present
        ]
        t = metrics["train_s"]
        rows.append(f"| {arm} (n={t['n_seeds']}) | " + " | ".join(cells) + f" | {t['mean']:.1f} |")
    return rows


def diff_table(results: dict, names: list[str]) -> list[str]:
    rows = [
        "| arm | metric | difference | 95% interval (items) | 95% t-interval (seeds) "
        "| p (seeds) | seeds |"
    ]
    rows.append("|---|---|---|---|---|---|---|")
    for arm, metrics in results["vs_sft"].items():
        for m in names:
            if m not in metrics:
                continue
            c = metrics[m]
            p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
            t = "n/a" if c["t_low"] is None else f"[{c['t_low']:+.4f}, {c['t_high']:+.4f}]"
            rows.append(
                f"| {arm} | {m} | {c['diff']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | "
                f"{t} | {p} | {len(c['seeds'])} |"
            )
    if len(rows) == 2:
        rows.append("| (none yet: needs an sft run and another arm) | | | | | | |")
    return rows


def run_table(results: dict) -> list[str]:
    rows = ["| arm | seed | optimiser steps | train s | of which generation s | eval s | "]
    rows[0] += "negative tokens (mean) |"
    rows.append("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        neg = r["negative_tokens_mean"]
        rows.append(
            f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['train_s']:.1f} | "
            f"{r['generation_s']:.1f} | {r['eval_s']:.1f} | "
            + ("" if neg is None else f"{neg:.1f}")
            + " |"
        )
    steps = {r["steps"] for r in results["runs"]}
    if len(steps) > 1:
        rows.append("")
        rows.append(f"WARNING: the arms took different numbers of optimiser steps: {steps}.")
    return rows


def rounded(values: list[float]) -> list[float]:
    return [round(v, 6) for v in values]


def write_outputs(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(out / "results.json")
    tmp = out / "report.md.tmp"
    tmp.write_text(report_text(results), encoding="utf-8")
    tmp.replace(out / "report.md")


# ---------------------------------------------------------------- the experiment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="start model folder (Hugging Face format)")
    p.add_argument("--tiny", action="store_true", help="tiny random model, small sizes, CPU")
    p.add_argument("--out", required=True, help="folder of results.json, report.md, run.log")
    p.add_argument("--work-dir", help="folder for run folders (default: a temporary one)")
    p.add_argument("--arms", default=ARMS)
    p.add_argument("--seeds", type=int)
    p.add_argument("--train", type=int, help="training demonstrations")
    p.add_argument("--heldout", type=int, help="held-out demonstrations (NLL)")
    p.add_argument("--gen-prompts", type=int, help="held-out prompts sampled per model")
    p.add_argument("--hh-pairs", type=int)
    p.add_argument("--uf-pairs", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate of every arm")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--generation-batch-size", default="auto")
    p.add_argument("--generation-backend", default="hf")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument(
        "--checkpoints",
        action="store_true",
        help="keep the package's resume checkpoints (off: runs here are never resumed)",
    )
    p.add_argument("--budget-s", type=float, default=0, help="wall-time budget (0 = none)")
    p.add_argument(
        "--continue-from",
        help="results.json of an earlier slice with the same settings: its runs are kept, and "
        "only the arm × seed runs it lacks are run (GPU time comes in slices)",
    )
    p.add_argument(
        "--leaderboard",
        default="",
        help="lm-eval tasks on the local files (e.g. arc_challenge,winogrande; needs lm-eval)",
    )
    p.add_argument("--leaderboard-limit", type=int, default=200, help="items per task (0 = all)")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("--model is required (or --tiny for the CPU trial)")
    for key, value in PROFILES["tiny" if args.tiny else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 2:
        p.error("--seeds must be >= 2 (the paired t-test over seeds needs two)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "sft" not in arms:
        p.error("--arms must include sft (every arm is compared with it)")
    for arm in arms:
        if parse_arm(arm)[0] not in ("sft", "spin", "irft"):
            p.error(f"--arms: {arm} is not an sft, spin or irft arm")
    args.arm_list = arms
    return args


# The tiny model mirrors SmolLM2's tokenizer where it matters to the code: a ChatML chat template,
# `<|im_end|>` as EOS and no pad token (as transformers 5.17 loads SmolLM2's), so the CPU trial
# takes the same template and padding paths as the GPU run.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_start(work: Path, examples: list[Example]) -> Path:
    from demoalign.tiny import tiny_model, train_tokenizer

    tokenizer = train_tokenizer([f"{ex.prompt}\n{ex.response}" for ex in examples[:200]], 512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = None
    tokenizer.chat_template = CHATML
    out = work / "tiny_model"
    tiny_model(tokenizer, hidden_size=64, num_layers=2, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def start_folder(args, work: Path) -> str:
    """--model as a Hugging Face folder: a `.gguf` (or a folder holding one) is converted once
    here, rather than dequantised again by every run."""
    try:
        from demoalign.gguf import convert_gguf, find_gguf
    except ImportError:  # a version without GGUF support takes folders only
        return args.model
    if find_gguf(args.model) is None:
        return args.model
    return str(convert_gguf(args.model, work / "start_model"))


def leaderboard_tasks(args) -> tuple[list[str], str]:
    if not args.leaderboard:
        return [], "not run (pass --leaderboard TASKS where lm-eval is installed)"
    from demoalign.eval.leaderboard import MissingExtra, import_lm_eval, parse_tasks

    tasks = parse_tasks(args.leaderboard)
    try:
        import_lm_eval()
    except MissingExtra as exc:
        return [], f"skipped: {exc}"
    limit = args.leaderboard_limit or "all"
    return tasks, f"{', '.join(tasks)} ({limit} items per task), lm-eval on local files"


def device_name(on_gpu: bool) -> str:
    if on_gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    env = f"DEMOALIGN_DATA={shlex.quote(os.environ.get('DEMOALIGN_DATA', ''))}"
    return f"{env} python {' '.join(shlex.quote(a) for a in sys.argv)}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text("", encoding="utf-8")
    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="real_text_"))
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; shared cores spin
    try:
        with GenerationEngine() as engine:  # one for the whole sweep: compiled once, not per run
            return run_experiment(args, out, work, device, on_gpu, started, engine)
    finally:
        torch.set_num_threads(threads)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def run_experiment(
    args, out: Path, work: Path, device, on_gpu: bool, started: float, engine: GenerationEngine
) -> dict:
    hh, uf = eval_pairs(HH, args.hh_pairs), eval_pairs(UF, args.uf_pairs)
    model = str(make_tiny_start(work, dolly_examples())) if args.tiny else start_folder(args, work)
    fits = length_filter(model, args.max_length, args.max_prompt_length)
    train_ex, heldout, dolly_counts = split_dolly(args.train, args.heldout, fits)
    data_file = work / "dolly_train.jsonl"
    write_jsonl(data_file, train_ex)
    tasks, board_status = leaderboard_tasks(args)
    log(f"real_text: {device_name(on_gpu)}; start model {model}; leaderboard: {board_status}", out)
    evaluator = Evaluator(heldout, hh, uf, args, device, engine, tasks)
    t0 = time.perf_counter()
    start_items, _ = evaluator.evaluate(Path(model), gen_seed=10_000)
    log(f"start model evaluated in {time.perf_counter() - t0:.1f} s", out)
    plan = [(seed, arm) for seed in range(args.seeds) for arm in args.arm_list]
    settings = {k: v for k, v in vars(args).items() if k != "arm_list"}
    settings["model"] = "tiny random model (--tiny)" if args.tiny else args.model
    earlier = earlier_slice(args, settings, start_items)
    done = {(r["seed"], r["arm"]) for r in earlier["runs"]} if earlier else set()
    plan = [p for p in plan if p not in done]
    results = {
        "status": "running",
        "command": command_line(),
        "device": device_name(on_gpu),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": settings,
        "data": {
            "train": DOLLY,
            "hh": HH,
            "uf": UF,
            "hh_pairs": len(hh),
            "uf_pairs": len(uf),
            "heldout": len(heldout),
            "dolly_records": dolly_counts["records"],
            "dolly_too_long": dolly_counts["too_long"],
        },
        "leaderboard": board_status,
        "definitions": {m: describe(m) for m in start_items},
        "start_model": {m: sum(v) / len(v) for m, v in start_items.items()},
        "planned_runs": len(plan) + len(done),
        "runs": list(earlier["runs"]) if earlier else [],
        "slices": (earlier.get("slices", []) if earlier else [])
        + [{"device": device_name(on_gpu), "runs": 0, "wall_s": 0.0}],
        "skipped": [],
        "failed": [],
        "summary": {},
        "vs_sft": {},
        "verdicts": [],
        "wall_s": time.perf_counter() - started,
    }
    import transformers

    results["versions"]["transformers"] = transformers.__version__
    write_outputs(out, results)
    for k, (seed, arm) in enumerate(plan):
        elapsed = time.perf_counter() - started
        estimate = run_estimate(results["runs"], arm)
        if args.budget_s and estimate is not None and elapsed + estimate > args.budget_s:
            results["skipped"] = [f"{a} seed {s}" for s, a in plan[k:]]
            results["status"] = (
                f"stopped by the budget ({args.budget_s:.0f} s) before {arm} seed {seed}"
            )
            log(results["status"], out)
            break
        try:
            run = one_run(arm, seed, args, data_file, model, work, on_gpu, evaluator)
        except Exception as exc:  # one failed run must not cost the others (no retries on GPU)
            results["failed"].append(f"{arm} seed {seed}: {type(exc).__name__}: {exc}")
            log(f"FAILED {arm} seed {seed}:\n{traceback.format_exc()}", out)
            shutil.rmtree(work / "runs", ignore_errors=True)
            free_memory()
            write_outputs(out, results)
            continue
        results["runs"].append(run)
        update(results, args, started)
        write_outputs(out, results)
        eta = remaining_estimate(results["runs"], plan[k + 1 :])
        log(
            f"[{k + 1}/{len(plan)}] {arm} seed {seed}: {run['steps']} steps, train "
            f"{run['train_s']:.1f} s (generation {run['generation_s']:.1f} s), eval "
            f"{run['eval_s']:.1f} s; elapsed {fmt_s(time.perf_counter() - started)}, "
            f"ETA {fmt_s(eta)}",
            out,
        )
    else:
        results["status"] = "finished" if not results["failed"] else "finished with failures"
    update(results, args, started)
    write_outputs(out, results)
    for line in results["verdicts"]:
        log(line.replace("**", ""), out)
    log(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}", out)
    return results


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


def one_run(arm, seed, args, data_file, model, work, on_gpu, evaluator) -> dict:
    run_dir = work / "runs" / arm.replace("@", "_") / f"seed{seed}"
    config = arm_config(arm, seed, args, data_file, model, run_dir, on_gpu)
    t0 = time.perf_counter()
    train(config, engine=evaluator.engine)
    train_s = time.perf_counter() - t0
    free_memory()
    facts = run_facts(run_dir)
    t0 = time.perf_counter()
    items, texts = evaluator.evaluate(run_dir / "final", gen_seed=10_000 + seed)
    eval_s = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)  # only metrics are kept: model folders are large
    method, stages, _ = parse_arm(arm)
    return {
        "arm": arm,
        "seed": seed,
        "stages": 0 if method == "sft" else stages,
        "steps": facts["steps"],
        "train_s": train_s,
        "generation_s": facts["generation_s"],
        "negative_tokens_mean": facts["negative_tokens_mean"],
        "eval_s": eval_s,
        "means": {m: sum(v) / len(v) for m, v in items.items()},
        "items": {m: rounded(v) for m, v in items.items()},
        "samples": texts,
    }


def update(results: dict, args, started: float) -> None:
    summary, extra = summarize_runs(results["runs"], args.arm_list, args.bootstrap)
    results["summary"] = summary
    results["vs_sft"] = extra["vs_sft"]
    tasks = [m[3:] for m in results["start_model"] if m.startswith("lb_")]
    results["verdicts"] = claims(extra["by_arm"], tasks)
    earlier = results["slices"][:-1]
    results["slices"][-1]["runs"] = len(results["runs"]) - sum(p["runs"] for p in earlier)
    results["slices"][-1]["wall_s"] = time.perf_counter() - started
    results["wall_s"] = sum(piece["wall_s"] for piece in results["slices"])


# Settings that say how a slice ran, not what was measured: free to differ between slices.
SLICE_KEYS = ("out", "work_dir", "budget_s", "continue_from", "checkpoints", "model")


def earlier_slice(args, settings: dict, start_items: dict) -> dict | None:
    """The results of `--continue-from`, refused unless they measured the same thing: the same
    settings (but SLICE_KEYS), and the same start-model metrics over the same items."""
    if not args.continue_from:
        return None
    earlier = json.loads(Path(args.continue_from).read_text(encoding="utf-8"))
    differ = sorted(
        key
        for key in set(settings) | set(earlier["settings"])
        if key not in SLICE_KEYS and settings.get(key) != earlier["settings"].get(key)
    )
    if differ:
        raise SystemExit(
            f"--continue-from {args.continue_from}: other settings ({', '.join(differ)}); "
            "a slice must repeat the earlier one's"
        )
    start = {m: sum(v) / len(v) for m, v in start_items.items()}
    if set(start) != set(earlier["start_model"]):
        raise SystemExit(f"--continue-from {args.continue_from}: other metrics")
    moved = [m for m in start if abs(start[m] - earlier["start_model"][m]) > 1e-3]
    if moved:
        raise SystemExit(
            f"--continue-from {args.continue_from}: the start model measures differently "
            f"({', '.join(moved)}): not the same model, data or items"
        )
    if "slices" not in earlier:  # written before slices were recorded: one slice
        earlier["slices"] = [
            {"device": earlier["device"], "runs": len(earlier["runs"]), "wall_s": earlier["wall_s"]}
        ]
    return earlier


if __name__ == "__main__":
    main()
