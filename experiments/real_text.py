"""The paper's claims re-tested on a real chat model with real human-written demonstrations.

    DEMOALIGN_DATA=/path/to/data python experiments/real_text.py --model MODEL_DIR --out OUT
    DEMOALIGN_DATA=/path/to/data python experiments/real_text.py --tiny --out OUT   # CPU trial

Start model: `--model`, a Hugging Face folder (or a GGUF, converted once); `--tiny`, a tiny
random ChatML model (a CPU check of the whole pipeline: its numbers mean nothing). Arms (continued
SFT, SPIN, IRFT T = 4 and T = 8, IRFT T = 4 with sft_weight = 1) start from it and train on the
same human-written Dolly demonstrations with the same optimiser steps and learning rate, seed-major
over seeds. Per-item metrics on held-out data (demoalign.eval.heldout): HH and UltraFeedback pairs
(implicit-reward accuracy, log-prob gap, pair win rate), per-token NLL of held-out Dolly
demonstrations, length and EOS rate of sampled responses, lm-eval tasks with `--leaderboard`.
Each arm against SFT (demoalign.sweep): paired over items (bootstrap interval, pooled over seeds)
and over seeds (paired t-test); verdicts as `demoalign demo` gives them.

Outputs in --out: results.json and report.md, rewritten after every arm × seed, and run.log.
Model folders live in --work-dir (default: a temporary folder); each is deleted once evaluated.
`--budget-s S` starts no run that would not end within S seconds; `--continue-from RESULTS_JSON`
keeps an earlier slice's runs. One GenerationEngine serves the whole sweep (compiled once). Why
Dolly, the learning rate, float32 log-probs and the expected wall time: experiments/real_text.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from demoalign.config import parse_arm
from demoalign.data.dolly import DOLLY, dolly_examples, split_dolly, write_jsonl
from demoalign.eval.heldout import (
    HeldoutEvaluator,
    HeldoutOptions,
    eval_pairs,
    leaderboard_tasks,
    length_filter,
)
from demoalign.generation import GenerationEngine
from demoalign.sweep import (
    Evaluation,
    Sweep,
    command_line,
    device_name,
    earlier_slice,
    run_sweep,
    versions,
    write_outputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its helper module, beside it
from real_text_parts import arm_config, describe, log, log_run, report_text, update  # noqa: E402

HH = "hh_rlhf/helpful-online/test.jsonl.gz"
UF = "ultrafeedback_sample/train_clean.jsonl"
ARMS = "sft,spin,irft_T4,irft_T8,irft_T4@sft1"
SIZES = (
    "seeds train heldout gen_prompts hh_pairs uf_pairs max_length max_prompt_length "
    "max_new_tokens batch_size lr eval_batch_size"
).split()
# Sizes for the GPU (SmolLM2-135M) and the CPU trial (a tiny model needs a large lr); flags win.
PROFILES = {
    "gpu": dict(zip(SIZES, (3, 256, 128, 128, 256, 256, 384, 128, 128, 8, 1e-6, 32))),
    "tiny": dict(zip(SIZES, (3, 32, 24, 16, 24, 24, 96, 48, 16, 4, 1e-3, 16))),
}
# Settings that say how a slice ran, not what was measured: free to differ between slices.
SLICE_KEYS = ("out", "work_dir", "budget_s", "continue_from", "checkpoints", "model")
OPTIONS = ("max_length", "max_prompt_length", "eval_batch_size", "gen_prompts", "max_new_tokens")
OPTIONS += ("leaderboard_limit",)  # the evaluator's settings
HELP = {
    "train": "training demonstrations",
    "heldout": "held-out demonstrations (NLL)",
    "gen_prompts": "held-out prompts sampled per model",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="start model folder (Hugging Face format)")
    p.add_argument("--tiny", action="store_true", help="tiny random model, small sizes, CPU")
    p.add_argument("--out", required=True, help="folder of results.json, report.md, run.log")
    p.add_argument("--work-dir", help="folder for run folders (default: a temporary one)")
    p.add_argument("--arms", default=ARMS)
    for key in SIZES:
        kind = float if key == "lr" else int
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=HELP.get(key))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--generation-batch-size", default="auto")
    p.add_argument("--generation-backend", default="hf")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--checkpoints", action="store_true", help="keep resume checkpoints")
    p.add_argument("--budget-s", type=float, default=0, help="wall-time budget (0 = none)")
    p.add_argument("--continue-from", help="results.json of an earlier slice, same settings")
    p.add_argument("--leaderboard", default="", help="lm-eval tasks (needs lm-eval)")
    p.add_argument("--leaderboard-limit", type=int, default=200, help="items per task (0 = all)")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("--model is required (or --tiny for the CPU trial)")
    for key, value in PROFILES["tiny" if args.tiny else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 2:
        p.error("--seeds must be >= 2 (the paired t-test over seeds needs two)")
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "sft" not in args.arm_list:
        p.error("--arms must include sft (every arm is compared with it)")
    for arm in args.arm_list:
        if parse_arm(arm)[0] not in ("sft", "spin", "irft"):
            p.error(f"--arms: {arm} is not an sft, spin or irft arm")
    return args


def make_tiny_start(work: Path) -> Path:
    """A tiny ChatML model (`<|im_end|>` as EOS, no pad token, as transformers loads SmolLM2's),
    so that the CPU trial takes the GPU run's template and padding paths."""
    from demoalign.tiny import TinyShape, chatml_tokenizer, save_tiny_model

    texts = [f"{ex.prompt}\n{ex.response}" for ex in dolly_examples()[:200]]
    return save_tiny_model(work / "tiny_model", chatml_tokenizer(texts, 512), TinyShape(64, 2))


def start_folder(args, work: Path) -> str:
    """--model as a Hugging Face folder: a `.gguf` (or a folder holding one) is converted once
    here, rather than dequantised again by every run."""
    from demoalign.gguf import convert_gguf, find_gguf

    if find_gguf(args.model) is None:
        return args.model
    return str(convert_gguf(args.model, work / "start_model"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text("", encoding="utf-8")
    on_gpu = torch.cuda.is_available() and not args.tiny
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="real_text_"))
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; shared cores spin
    try:
        with GenerationEngine() as engine:  # one for the whole sweep: compiled once, not per run
            return run_experiment(args, out, work, on_gpu, started, engine)
    finally:
        torch.set_num_threads(threads)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def prepare(args, work: Path, on_gpu: bool, out: Path, engine: GenerationEngine):
    """The start model, the training data file, the evaluator and the data facts."""
    hh, uf = eval_pairs(HH, args.hh_pairs), eval_pairs(UF, args.uf_pairs)
    model = str(make_tiny_start(work)) if args.tiny else start_folder(args, work)
    fits = length_filter(model, args.max_length, args.max_prompt_length)
    train_ex, heldout, counts = split_dolly(args.train, args.heldout, fits)
    data_file = work / "dolly_train.jsonl"
    write_jsonl(data_file, train_ex)
    tasks, board = leaderboard_tasks(args.leaderboard, args.leaderboard_limit)
    log(f"real_text: {device_name(on_gpu)}; start model {model}; leaderboard: {board}", out)
    options = HeldoutOptions(**{k: vars(args)[k] for k in OPTIONS}, leaderboard_tasks=tasks)
    device = torch.device("cuda" if on_gpu else "cpu")
    evaluator = HeldoutEvaluator(heldout, {"hh": hh, "uf": uf}, options, device, engine)
    data = {"train": DOLLY, "hh": HH, "uf": UF, "hh_pairs": len(hh), "uf_pairs": len(uf)}
    data.update(heldout=len(heldout), dolly_records=counts["records"])
    data["dolly_too_long"] = counts["too_long"]
    return model, data_file, evaluator, {"data": data, "leaderboard": board}


def first_results(args, on_gpu: bool, start_items: dict, facts: dict) -> dict:
    """results.json before this slice's runs: the settings, the start model, earlier slices."""
    start = {m: sum(v) / len(v) for m, v in start_items.items()}
    settings = {k: v for k, v in vars(args).items() if k != "arm_list"}
    settings["model"] = "tiny random model (--tiny)" if args.tiny else args.model
    earlier = {"runs": [], "slices": []}
    if args.continue_from:
        earlier = earlier_slice(args.continue_from, settings, start, SLICE_KEYS)
    return {
        "status": "running",
        "command": command_line(),
        "device": device_name(on_gpu),
        "versions": versions(),
        "settings": settings,
        **facts,
        "definitions": {m: describe(m) for m in start_items},
        "start_model": start,
        "planned_runs": len(args.arm_list) * args.seeds,
        "runs": list(earlier["runs"]),
        "slices": earlier["slices"] + [{"device": device_name(on_gpu), "runs": 0, "wall_s": 0.0}],
        "failed": [],
        "skipped": [],
    }


def run_experiment(
    args, out: Path, work: Path, on_gpu: bool, started: float, engine: GenerationEngine
) -> dict:
    model, data_file, evaluator, facts = prepare(args, work, on_gpu, out, engine)
    t0 = time.perf_counter()
    start_items, _ = evaluator.evaluate(Path(model), gen_seed=10_000)
    log(f"start model evaluated in {time.perf_counter() - t0:.1f} s", out)
    results = first_results(args, on_gpu, start_items, facts)
    kept = len(results["runs"])

    def write(outcome=None):
        update(results, outcome, args.arm_list, args.bootstrap, started)
        write_outputs(out, results, report_text(results))

    def on_run(outcome, seed, arm, rest):
        write(outcome)
        if outcome.error:
            log(f"FAILED {arm} seed {seed}:\n{outcome.error}", out)
        else:
            k = len(outcome.runs) + len(outcome.failed) - kept
            log_run(outcome.runs, rest, k, started, out)

    sweep = Sweep(
        arms=args.arm_list,
        seeds=list(range(args.seeds)),
        arm_config=lambda arm, seed, to: arm_config(arm, seed, args, data_file, model, to, on_gpu),
        evaluate=lambda path, seed: keep_samples(*evaluator.evaluate(path, 10_000 + seed)),
        runs_dir=work / "runs",
        keep_models=False,
        item_decimals=6,
        budget_s=args.budget_s,
        keep_going=True,
        engine=engine,
    )
    write()
    outcome = run_sweep(sweep, results["runs"][:kept], on_run)
    write(outcome)
    for line in [outcome.status] * outcome.status.startswith("stopped") + results["verdicts"]:
        log(line.replace("**", ""), out)
    log(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}", out)
    return results


def keep_samples(items: dict, texts: list[str]) -> Evaluation:
    return Evaluation(items, {"samples": texts})


if __name__ == "__main__":
    main()
