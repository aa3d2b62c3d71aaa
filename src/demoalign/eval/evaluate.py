"""`demoalign eval`: which model is better, and by how much, with bootstrap intervals.

Every figure is the mean of one value per item (pair or prompt), defined in `metrics.py`, so each
gets the same percentile-bootstrap interval over items (seeded; `bootstrap_resamples`,
`confidence`). Leaderboard tasks run through lm-evaluation-harness on local files
(`leaderboard.py`); reward-model scores through `reward_scoring.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import EvalConfig, build_config, config_to_dict
from ..data import Example, load_prompts
from ..data.sources import HELDOUT_SEED, data_root, preference_pairs
from ..data.tasks import get_task, task_prompts
from ..encoding import Encoder
from ..generation import GenerationEngine, generate_responses
from ..modelcard import record_eval
from ..models import (
    check_model_path,
    check_reward_model,
    load_model_and_tokenizer,
    load_reward_model,
)
from ..runio import atomic_write_jsonl, atomic_write_text, atomic_write_yaml
from ..templates import resolve_template
from .leaderboard import LeaderboardRun, import_lm_eval, parse_tasks, run_leaderboard
from .metrics import (
    DEFINITIONS,
    generation_reward,
    pair_sequence_logps,
    pair_values,
    task_sampling,
    win_values,
)
from .report import write_report
from .reward_scoring import reward_scores, reward_text
from .stats import paired_deltas, summarize


def model_names(paths: list[str]) -> list[str]:
    """The shortest path endings that tell the models apart (runs/a/final, runs/b/final → a/final,
    b/final)."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"models are listed twice: {paths}")


def load_pairs(spec: str, limit: int | None = None) -> list[tuple[Example, str]]:
    """Preference pairs from a file, or `task:NAME[:SEED]` (200 held-out pairs by default)."""
    return preference_pairs(spec, limit, HELDOUT_SEED, task_count=200)


def read_generations(path: Path, prompts: list[Example]) -> list[dict]:
    records = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if [r.get("prompt") for r in records] != [p.prompt for p in prompts]:
        raise ValueError(
            f"{path} holds generations for other prompts than prompts=…; pass regenerate=true"
        )
    return records


def generation_file(out: Path, name: str) -> Path:
    return out / "generations" / (name.replace("/", "__") + ".jsonl")


def stage_gaps(run_dir: str, config: EvalConfig) -> list[dict]:
    """Log-prob gap demonstration − negative under each stage's start model, from a training run's
    stages/<k>/negatives.jsonl (IRFT/SPIN) or iterations/<k>/negatives.jsonl (RFT)."""
    root = Path(run_dir)
    files = sorted(root.glob("stages/*/negatives.jsonl"), key=lambda p: int(p.parent.name))
    keys = ("ref_logp_demonstration", "ref_logp_negative")
    if not files:
        files = sorted(root.glob("iterations/*/negatives.jsonl"), key=lambda p: int(p.parent.name))
        keys = ("policy_logp_demonstration", "policy_logp_negative")
    if not files:
        raise ValueError(
            f"run_dir={run_dir}: no stages/<k>/negatives.jsonl or iterations/<k>/negatives.jsonl"
        )
    out = []
    for f in files:
        recs = [
            json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        gaps = [r[keys[0]] - r[keys[1]] for r in recs]
        if gaps:
            out.append(
                {
                    "stage": int(f.parent.name),
                    **summarize(gaps, config.bootstrap_resamples, config.seed, config.confidence),
                }
            )
    return out


def _device(config: EvalConfig):
    return torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")


@dataclass
class _Inputs:
    """Everything evaluate() reads, loaded before any model runs (a bad file fails first)."""

    paths: list[str]
    names: list[str]
    baseline: str | None
    pairs: list = field(default_factory=list)  # Preference pairs
    prompts: list = field(default_factory=list)
    leaderboard: list = field(default_factory=list)
    task: object = None
    task_prompts: list | None = None


def _load_inputs(config: EvalConfig) -> _Inputs:
    paths = config.model_list()
    resolved = [Path(p).resolve() for p in paths]
    if config.baseline and Path(config.baseline).resolve() not in resolved:
        paths.append(config.baseline)
        resolved.append(Path(config.baseline).resolve())
    for path in paths:  # each one before any data or model is read
        check_model_path(path, "baseline" if path == config.baseline else "models")
    if config.reference:
        check_model_path(config.reference, "reference")
    names = model_names(paths)
    baseline = names[resolved.index(Path(config.baseline).resolve())] if config.baseline else None
    inputs = _Inputs(paths, names, baseline)
    if config.pairs:
        inputs.pairs = load_pairs(config.pairs, config.max_pairs or None)
    if config.prompts:
        inputs.prompts = load_prompts(config.prompts, config.max_prompts or None)
    if config.reward_model:
        check_reward_model(config.reward_model)
    if config.leaderboard:
        inputs.leaderboard = parse_tasks(config.leaderboard)
        import_lm_eval()  # a missing extra fails here, before any model is run
    if config.task:
        inputs.task = get_task(config.task)
        inputs.task_prompts = task_prompts(inputs.task, config.task_prompts, config.task_seed)
    return inputs


def _encoder_for(tokenizer, config: EvalConfig) -> Encoder:
    template = resolve_template(tokenizer, config.template)
    return Encoder(tokenizer, template, config.max_length, config.max_prompt_length)


def _reference_logps(config: EvalConfig, inputs: _Inputs, device):
    if not (inputs.pairs and config.reference):
        return None, None
    ref, ref_tok = load_model_and_tokenizer(config.reference)
    return pair_sequence_logps(
        ref.to(device),
        _encoder_for(ref_tok, config),
        inputs.pairs,
        config.eval_batch_size,
        fit=True,
    )


def _model_metrics(engine, model, tokenizer, config, inputs: _Inputs, refs, stats) -> dict:
    """One model's entry: pair and task metrics (sampled through `engine`), and its leaderboard
    results."""
    device = _device(config)
    encoder = _encoder_for(tokenizer, config)
    entry = {"metrics": {}, "items": {}}  # items: per-item values, for paired differences
    if inputs.pairs:
        good, bad = pair_sequence_logps(
            model, encoder, inputs.pairs, config.eval_batch_size, fit=True
        )
        for metric, vals in pair_values(good, bad, *refs).items():
            entry["metrics"][metric] = summarize(vals, **stats)
            entry["items"][metric] = vals
        entry["pairs_truncated"] = encoder.counts.responses_cut
    if inputs.task is not None:
        for mode in ("sampled", "greedy"):
            options = task_sampling(
                config.max_new_tokens,
                greedy=mode == "greedy",
                seed=config.seed,
                batch_size=config.eval_batch_size,
                backend=config.generation_backend,
            )
            rewards = generation_reward(
                engine, model, encoder, inputs.task, inputs.task_prompts, options
            )
            entry["metrics"][f"task_exact_match_{mode}"] = summarize(rewards, **stats)
            entry["items"][f"task_exact_match_{mode}"] = rewards
    if inputs.leaderboard:
        how = LeaderboardRun(
            root=Path(config.leaderboard_data or data_root()),
            limit=config.leaderboard_limit or None,
            mmlu_shots=config.mmlu_shots,
            batch_size=config.eval_batch_size,
            seed=config.seed,
            device=device,
        )
        board = run_leaderboard(model, tokenizer, inputs.leaderboard, how)
        for task_name, r in board.items():
            entry["items"][task_name] = r["values"]
            entry["metrics"][task_name] = {
                **summarize(r["values"], **stats),
                "task": r["lm_eval_task"],
                "metric": r["metric"],
                "num_fewshot": r["num_fewshot"],
            }
            entry.setdefault("definitions", {})[task_name] = (
                f"lm-evaluation-harness {r['lm_eval_task']}: {r['metric']}, "
                f"{r['num_fewshot']}-shot, local files"
            )
    return entry


def _generations(engine, model, tokenizer, name: str, config: EvalConfig, inputs, out: Path):
    file = generation_file(out, name)
    if not config.regenerate and file.exists():
        return read_generations(file, inputs.prompts)
    encoder = _encoder_for(tokenizer, config)
    records = generate_responses(engine, model, tokenizer, encoder, inputs.prompts, config)
    atomic_write_jsonl(file, records)
    return records


def _score_generations(
    config: EvalConfig, results: dict, generations: dict, items: dict, out: Path, device, stats
) -> None:
    rm, rm_tok = load_reward_model(config.reward_model)
    rm = rm.to(device).eval()
    scores = {}
    for name, records in generations.items():
        texts = [reward_text(config.reward_template, r["prompt"], r["response"]) for r in records]
        scores[name] = reward_scores(
            rm, rm_tok, texts, config.eval_batch_size, config.reward_max_length
        )
        for r, s in zip(records, scores[name]):
            r["reward"] = s
        atomic_write_jsonl(generation_file(out, name), records)
    for entry in results["models"]:
        entry["metrics"]["reward_score"] = summarize(scores[entry["name"]], **stats)
        items[entry["name"]]["reward_score"] = scores[entry["name"]]
        if results["baseline"]:
            wins = win_values(scores[entry["name"]], scores[results["baseline"]])
            entry["metrics"]["win_rate_vs_baseline"] = summarize(wins, **stats)


def _paired_differences(results: dict, items: dict, baseline: str, stats: dict) -> None:
    """Per model and metric: the mean over the same items of (model − baseline), with a paired
    bootstrap interval (items resampled jointly for both models)."""
    base = items[baseline]
    for entry in results["models"]:
        if entry["name"] == baseline:
            continue
        mine = items[entry["name"]]
        entry["vs_baseline"] = {
            metric: summarize(paired_deltas(mine[metric], base[metric]), **stats)
            for metric in mine
            if metric in base
        }


def evaluate(
    config: EvalConfig | None = None, engine: GenerationEngine | None = None, **values
) -> dict:
    """Evaluate `config.models` (an EvalConfig, or its keys as keyword arguments); writes
    results.json, report.md and plots to `output_dir` and returns the results. Every model
    samples through one GenerationEngine (`engine`, else one created here and closed at the end),
    each model finished after its evaluation, so a compiled decode step serves them all."""
    if engine is None:
        with GenerationEngine() as own:
            return evaluate(config, own, **values)
    config = build_config(EvalConfig, values) if config is None else config
    config.validate()
    out = Path(config.output_dir)
    if (out / "results.json").exists() and not config.overwrite:
        raise FileExistsError(
            f"{out} holds an earlier evaluation; pass overwrite=true to replace its results"
        )
    inputs = _load_inputs(config)
    device = _device(config)
    stats = dict(
        n_resamples=config.bootstrap_resamples, seed=config.seed, confidence=config.confidence
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(out / "config.yaml", config_to_dict(config))
    refs = _reference_logps(config, inputs, device)
    results = {
        "models": [],
        "baseline": inputs.baseline,
        "reference": config.reference or None,
        "definitions": {},
        "settings": asdict(config),
    }
    generations: dict[str, list[dict]] = {}
    items: dict[str, dict[str, list[float]]] = {}
    for name, path in zip(inputs.names, inputs.paths):
        model, tokenizer = load_model_and_tokenizer(path)
        model.to(device)
        with engine.for_model(model):
            entry = _model_metrics(engine, model, tokenizer, config, inputs, refs, stats)
            results["definitions"].update(entry.pop("definitions", {}))
            items[name] = entry.pop("items")
            results["models"].append({"name": name, "path": path, **entry})
            if inputs.prompts:
                generations[name] = _generations(
                    engine, model, tokenizer, name, config, inputs, out
                )
        del model
    if inputs.prompts:
        _score_generations(config, results, generations, items, out, device, stats)
    if inputs.baseline:
        _paired_differences(results, items, inputs.baseline, stats)
    _write_results(results, config, out)
    return results


def _write_results(results: dict, config, out: Path) -> None:
    """The definitions of the metrics given, the stage curves of `run_dir`, results.json,
    report.md, and the figures in the model card of every evaluated run folder."""
    used = {m for e in results["models"] for m in e["metrics"]}
    results["definitions"] = {
        **{k: v for k, v in DEFINITIONS.items() if k in used},
        **results["definitions"],
    }
    if config.run_dir:
        results["run_stages"] = stage_gaps(config.run_dir, config)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results, config)
    source = {"output_dir": str(out), "pairs": config.pairs, "task": config.task}
    for entry in results["models"]:
        record_eval(entry["path"], entry, {**source, "reward_model": config.reward_model})
