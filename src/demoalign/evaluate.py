"""`demoalign eval`: which model is better, and by how much (SPEC.md §5), with bootstrap intervals.

Every figure is the mean of one value per item (pair or prompt), so each gets the same
percentile-bootstrap interval over items (seeded; `bootstrap_resamples`, `confidence`):

- preference pairs (x, y_w, y_l): `logp_gap` = log π(y_w|x) − log π(y_l|x); `pair_win_rate` =
  [log π(y_w|x) > log π(y_l|x)] (reference-free form); `implicit_reward_accuracy` =
  [(log π(y_w) − log π_ref(y_w)) > (log π(y_l) − log π_ref(y_l))] (the sign of β·(…) does not
  depend on β > 0). Ties count ½. Log-probs are the training code's own
  (`taskeval.pair_sequence_logps` → `pairs.pair_logps`), responses cut to `max_length` as in training.
- built-in task: `task_exact_match_sampled` / `_greedy` (`taskeval.generation_reward`).
- leaderboard (`leaderboard=all`): lm-evaluation-harness on local files (leaderboard.py); each
  result also records `task`, `metric` and `num_fewshot`.
- reward model: one seeded generation per prompt per model (the training template and sampling),
  saved to `generations/<model>.jsonl`; `reward_score` = R(x, y); `win_rate_vs_baseline` =
  [R(x, y_model) > R(x, y_baseline)], ties ½.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .batching import Encoder
from .config import EvalConfig, build_config, config_to_dict
from .data import DataError, Example, load_preference_pairs, load_prompts
from .runio import atomic_write_jsonl, atomic_write_text, atomic_write_yaml
from .taskeval import _win, generation_reward, pair_metrics, pair_sequence_logps

DEFINITIONS = {
    "logp_gap": "mean of log π(chosen|x) − log π(rejected|x)",
    "pair_win_rate": "share of pairs with log π(chosen|x) > log π(rejected|x) (reference-free; ties ½)",
    "implicit_reward_accuracy": "share of pairs with log π/π_ref(chosen) > log π/π_ref(rejected) (ties ½)",
    "task_exact_match_sampled": "share of held-out task prompts answered exactly right, sampled (temperature 1)",
    "task_exact_match_greedy": "share of held-out task prompts answered exactly right, greedy",
    "reward_score": "mean reward-model score of one generation per prompt",
    "win_rate_vs_baseline": "share of prompts where R(x, y_model) > R(x, y_baseline) (ties ½)",
}


# ---------------------------------------------------------------- statistics


def bootstrap_interval(values: list[float], n_resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (resampling items with replacement)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        means.append(x[rng.integers(0, x.size, size=(rows, x.size))].mean(axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1 - tail])
    return float(low), float(high)


def summarize(values: list[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """{value: mean, low, high: bootstrap interval, n}."""
    low, high = bootstrap_interval(values, n_resamples, seed, confidence)
    return {"value": sum(values) / len(values), "low": low, "high": high, "n": len(values)}


def pair_values(good: list[float], bad: list[float], ref_good=None, ref_bad=None) -> dict[str, list[float]]:
    """Per-pair values whose means are taskeval.pair_metrics (the implicit-reward accuracy only
    with a reference)."""
    out = {"logp_gap": [g - b for g, b in zip(good, bad)],
           "pair_win_rate": [_win(g, b) for g, b in zip(good, bad)]}
    if ref_good is not None:
        out["implicit_reward_accuracy"] = [_win(g - rg, b - rb) for g, b, rg, rb in zip(good, bad, ref_good, ref_bad)]
    return out


def win_values(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """1 where the model's score beats the baseline's on the same prompt, ½ on a tie, else 0."""
    if len(scores) != len(baseline_scores):
        raise ValueError("win rate needs one score per prompt for both models")
    return [_win(a, b) for a, b in zip(scores, baseline_scores)]


# ---------------------------------------------------------------- inputs


def model_names(paths: list[str]) -> list[str]:
    """The shortest path endings that tell the models apart (runs/a/final, runs/b/final → a/final, b/final)."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"models are listed twice: {paths}")


def load_pairs(spec: str, limit: int | None = None) -> list[tuple[Example, str]]:
    """Preference pairs from a file (data.load_preference_pairs) or `task:NAME[:SEED]`."""
    if spec.startswith("task:"):
        from .tasks import get_task, task_pairs, task_prompts

        name, _, seed = spec[len("task:"):].partition(":")
        task = get_task(name)
        prompts = task_prompts(task, limit or 200, int(seed or 2))
        return [(Example(p, good), bad) for p, good, bad in task_pairs(task, prompts, int(seed or 2))]
    return load_preference_pairs(spec, limit)


def check_reward_model(path: str) -> None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"reward_model={path}: cannot read its config ({exc})") from None
    if cfg.num_labels != 1:
        raise ValueError(f"reward_model={path} has num_labels={cfg.num_labels}; a reward model must give one "
                         "score per sequence (AutoModelForSequenceClassification with num_labels=1)")


def load_reward_model(path: str, device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.truncation_side = "left"  # keep the response's end
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def reward_text(template: str, prompt: str, response: str) -> str:
    """`template` with {prompt} and {response} filled in (braces inside the texts are left alone)."""
    before, after = template.split("{response}")
    return before.replace("{prompt}", prompt) + response + after.replace("{prompt}", prompt)


@torch.no_grad()
def reward_scores(model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """One score per text, from an EXTERNAL reward model given by path (its own text format via
    `reward_template`). Rows are right-padded and transformers pools at each row's last non-pad
    token, so a text that itself ends in the pad id (pad = EOS tokenizers) is pooled one token
    earlier. A reward model trained by `demoalign rft` is scored on training token ids by
    `rft.RewardScorer` instead; this function is not meant for it."""
    device = next(model.parameters()).device
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    out: list[float] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        out += logits[:, 0].float().tolist()
    return out


# ---------------------------------------------------------------- generations


def generate_responses(model, tokenizer, encoder: Encoder, prompts: list[Example], config: EvalConfig) -> list[dict]:
    from .generation import generate_ids

    ids = [encoder.prompt_ids(p) for p in prompts]
    out = generate_ids(model, tokenizer, ids, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                       top_p=config.top_p, greedy=config.greedy, batch_size=config.batch_size, seed=config.seed,
                       show_progress=False)
    return [{"prompt": p.prompt, "history": [list(t) for t in p.history],
             "response": tokenizer.decode(out[i], skip_special_tokens=True), "tokens": len(out[i]),
             "finished": bool(out[i]) and out[i][-1] == tokenizer.eos_token_id} for i, p in enumerate(prompts)]


def read_generations(path: Path, prompts: list[Example]) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r.get("prompt") for r in records] != [p.prompt for p in prompts]:
        raise ValueError(f"{path} holds generations for other prompts than prompts=…; pass regenerate=true")
    return records


def generation_file(out: Path, name: str) -> Path:
    return out / "generations" / (name.replace("/", "__") + ".jsonl")


# ---------------------------------------------------------------- run-folder stages


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
        raise ValueError(f"run_dir={run_dir}: no stages/<k>/negatives.jsonl or iterations/<k>/negatives.jsonl")
    out = []
    for f in files:
        recs = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        gaps = [r[keys[0]] - r[keys[1]] for r in recs]
        if gaps:
            out.append({"stage": int(f.parent.name),
                        **summarize(gaps, config.bootstrap_resamples, config.seed, config.confidence)})
    return out


# ---------------------------------------------------------------- the evaluation


def _device(config: EvalConfig):
    return torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")


def evaluate(config: EvalConfig | None = None, **values) -> dict:
    """Evaluate `config.models` (an EvalConfig, or its keys as keyword arguments); writes
    results.json, report.md and plots to `output_dir` and returns the results."""
    from .run import load_model_and_tokenizer
    from .templates import resolve_template

    if config is None:
        config = build_config(EvalConfig, values)
    else:
        config.validate()
    out = Path(config.output_dir)
    if (out / "results.json").exists() and not config.overwrite:
        raise FileExistsError(f"{out} holds an earlier evaluation; pass overwrite=true to replace its results")
    paths = config.model_list()
    if config.baseline and Path(config.baseline).resolve() not in [Path(p).resolve() for p in paths]:
        paths.append(config.baseline)
    names = model_names(paths)
    baseline = names[[Path(p).resolve() for p in paths].index(Path(config.baseline).resolve())] if config.baseline else None
    device = _device(config)
    stats = dict(n_resamples=config.bootstrap_resamples, seed=config.seed, confidence=config.confidence)

    # Inputs first: a bad file or reward model fails before any model is run.
    pairs = load_pairs(config.pairs, config.max_pairs or None) if config.pairs else []
    triples = [(example, example.response, rejected) for example, rejected in pairs]
    prompts = load_prompts(config.prompts, config.max_prompts or None) if config.prompts else []
    if config.reward_model:
        check_reward_model(config.reward_model)
    leaderboard = []
    if config.leaderboard:
        from .leaderboard import import_lm_eval, parse_tasks

        leaderboard = parse_tasks(config.leaderboard)
        import_lm_eval()  # a missing extra fails here, before any model is run
    task = task_list = None
    if config.task:
        from .tasks import get_task, task_prompts

        task = get_task(config.task)
        task_list = task_prompts(task, config.task_prompts, config.task_seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(out / "config.yaml", config_to_dict(config))

    def encoder_for(tokenizer) -> Encoder:
        return Encoder(tokenizer, resolve_template(tokenizer, config.template), config.max_length, config.max_prompt_length)

    ref_good = ref_bad = None
    if triples and config.reference:
        ref, ref_tok = load_model_and_tokenizer(config.reference)
        ref_good, ref_bad = pair_sequence_logps(ref.to(device), encoder_for(ref_tok), triples, config.batch_size, fit=True)
        del ref

    results = {"models": [], "baseline": baseline, "reference": config.reference or None,
               "definitions": {}, "settings": asdict(config)}
    generations: dict[str, list[dict]] = {}
    for name, path in zip(names, paths):
        model, tokenizer = load_model_and_tokenizer(path)
        model.to(device)
        encoder = encoder_for(tokenizer)
        entry = {"name": name, "path": path, "metrics": {}}
        if triples:
            good, bad = pair_sequence_logps(model, encoder, triples, config.batch_size, fit=True)
            for metric, vals in pair_values(good, bad, ref_good, ref_bad).items():
                entry["metrics"][metric] = summarize(vals, **stats)
            entry["pairs_truncated"] = encoder.counts.responses_cut
        if task is not None:
            for mode in ("sampled", "greedy"):
                rewards = generation_reward(model, encoder, task, task_list, greedy=mode == "greedy", seed=config.seed,
                                            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
                entry["metrics"][f"task_exact_match_{mode}"] = summarize(rewards, **stats)
        if leaderboard:
            from .leaderboard import run_leaderboard
            from .tiny import shared_data_dir

            board = run_leaderboard(model, tokenizer, leaderboard, root=Path(config.leaderboard_data or shared_data_dir()),
                                    limit=config.leaderboard_limit or None, mmlu_shots=config.mmlu_shots,
                                    batch_size=config.batch_size, seed=config.seed, device=device)
            for task_name, r in board.items():
                entry["metrics"][task_name] = {**summarize(r["values"], **stats), "task": r["lm_eval_task"],
                                               "metric": r["metric"], "num_fewshot": r["num_fewshot"]}
                results["definitions"][task_name] = (f"lm-evaluation-harness {r['lm_eval_task']}: {r['metric']}, "
                                                     f"{r['num_fewshot']}-shot, local files")
        if prompts:
            file = generation_file(out, name)
            if not config.regenerate and file.exists():
                generations[name] = read_generations(file, prompts)
            else:
                generations[name] = generate_responses(model, tokenizer, encoder, prompts, config)
                atomic_write_jsonl(file, generations[name])
        del model
        results["models"].append(entry)

    if prompts:
        rm, rm_tok = load_reward_model(config.reward_model, device)
        scores = {}
        for name, records in generations.items():
            texts = [reward_text(config.reward_template, r["prompt"], r["response"]) for r in records]
            scores[name] = reward_scores(rm, rm_tok, texts, config.batch_size, config.reward_max_length)
            for r, s in zip(records, scores[name]):
                r["reward"] = s
            atomic_write_jsonl(generation_file(out, name), records)
        for entry in results["models"]:
            entry["metrics"]["reward_score"] = summarize(scores[entry["name"]], **stats)
            if baseline:
                wins = win_values(scores[entry["name"]], scores[baseline])
                entry["metrics"]["win_rate_vs_baseline"] = summarize(wins, **stats)
        del rm

    used = {m for e in results["models"] for m in e["metrics"]}
    results["definitions"] = {**{k: v for k, v in DEFINITIONS.items() if k in used}, **results["definitions"]}
    if config.run_dir:
        results["run_stages"] = stage_gaps(config.run_dir, config)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results, config)
    return results


# ---------------------------------------------------------------- report


def _cell(m: dict) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def write_report(out: Path, results: dict, config: EvalConfig) -> None:
    metrics = [m for m in DEFINITIONS if m in results["definitions"]]
    metrics += [m for m in results["definitions"] if m not in DEFINITIONS]
    plots = plot_metrics(out, results, metrics)
    level = f"{config.confidence:.0%}"
    lines = ["# demoalign eval", "",
             f"Value [{level} bootstrap interval, {config.bootstrap_resamples} resamples, seed {config.seed}]; "
             "n = pairs or prompts.", ""]
    if metrics:
        lines += ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for e in results["models"]:
            cells = [_cell(e["metrics"][m]) if m in e["metrics"] else "" for m in metrics]
            lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
        ns = {m: sorted({e["metrics"][m]["n"] for e in results["models"] if m in e["metrics"]}) for m in metrics}
        lines += ["", "n: " + ", ".join(f"{m} {'/'.join(map(str, v))}" for m, v in ns.items())]
        cut = {e["name"]: e["pairs_truncated"] for e in results["models"] if e.get("pairs_truncated")}
        if cut:
            lines.append(f"Responses cut to max_length={config.max_length} (as in training): "
                         + ", ".join(f"{k} {v}" for k, v in cut.items()))
        lines.append("")
    if config.pairs and not config.reference:
        lines += ["No `reference` was given: the implicit-reward accuracy (SPEC §5's first form) was not "
                  "computed; only the reference-free form is reported.", ""]
    lines += ["## Definitions", ""] + [f"- `{k}`: {v}" for k, v in results["definitions"].items()]
    if results.get("reference"):
        lines.append(f"- reference model of the implicit reward: `{results['reference']}`")
    if results.get("baseline"):
        lines.append(f"- win-rate baseline: `{results['baseline']}`; reward model `{config.reward_model}`, "
                     f"input template `{config.reward_template}`; generations in `generations/`")
    if results.get("run_stages"):
        lines += ["", "## Log-prob gap over training stages", "",
                  f"Demonstration − negative under each stage's start model, run `{config.run_dir}`.", "",
                  "| stage | logp gap | n |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {_cell(s)} | {s['n']} |" for s in results["run_stages"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def plot_metrics(out: Path, results: dict, metrics: list[str]) -> list[str]:
    """metrics.png (one panel per metric: value per model with its interval) and, with a run
    folder, logp_gap_over_stages.png. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if metrics:
        names = [e["name"] for e in results["models"]]
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(4, 3.2 * len(metrics)), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            xs, ys, lo, hi = [], [], [], []
            for i, e in enumerate(results["models"]):
                if metric in e["metrics"]:
                    m = e["metrics"][metric]
                    xs.append(i), ys.append(m["value"]), lo.append(m["value"] - m["low"]), hi.append(m["high"] - m["value"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(metric, fontsize=9)
            if metric in ("pair_win_rate", "implicit_reward_accuracy", "win_rate_vs_baseline"):
                ax.axhline(0.5, color="gray", ls="--", lw=1)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        written.append("metrics.png")
    stages = results.get("run_stages")
    if stages:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = [s["stage"] for s in stages]
        ax.errorbar(xs, [s["value"] for s in stages], capsize=4, marker="o",
                    yerr=[[s["value"] - s["low"] for s in stages], [s["high"] - s["value"] for s in stages]])
        ax.set_xlabel("stage")
        ax.set_ylabel("log π(demo) − log π(negative)")
        fig.tight_layout()
        fig.savefig(out / "logp_gap_over_stages.png", dpi=110)
        plt.close(fig)
        written.append("logp_gap_over_stages.png")
    return written


__all__ = ["evaluate", "bootstrap_interval", "summarize", "pair_values", "pair_metrics", "win_values",
           "reward_scores", "reward_text", "load_pairs", "load_prompts", "model_names", "stage_gaps"]
