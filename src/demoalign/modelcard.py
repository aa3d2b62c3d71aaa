"""Model cards (README.md in the Hugging Face format) of the models a run writes.

A card is YAML front matter (`base_model`, `library_name`, `tags`, ...) then Markdown: the
method and its settings, the data, the training figures from metrics.jsonl and, once
`demoalign eval` has evaluated the folder, its figures. Rendering is pure (config dict and
records in, text out); the callers write the card inside the folder's atomic save
(runio.save_pretrained_atomic), and `demoalign eval` rewrites it atomically.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import yaml

from .runio import atomic_write_text

TAG = "demoalign"
EVAL_MARKER = "<!-- demoalign eval: rewritten by each `demoalign eval` of this folder -->"

METHODS = {
    "sft": "SFT: supervised fine-tuning on the demonstrations (token-level NLL)",
    "spin": "SPIN: implicit-reward fine-tuning, negatives regenerated once per iteration",
    "irft": "IRFT: implicit-reward fine-tuning, negatives regenerated at each of T stages",
    "rft": "RFT: an explicit reward model learnt from demonstrations, then RLOO against it",
}
# The settings shown first, in this order, where the method has them (all are in config.yaml).
SETTINGS = {
    "beta": "β",
    "stages": "T (stages)",
    "iterations": "iterations",
    "outer_iterations": "T (outer iterations)",
    "loss_type": "loss",
    "reward_loss": "reward loss",
    "learning_rate": "learning rate",
    "reward_learning_rate": "reward learning rate",
    "epochs": "epochs",
    "epochs_per_stage": "epochs per stage",
    "reward_steps": "reward steps per iteration",
    "policy_steps": "policy steps per iteration",
    "rollouts": "rollouts per prompt",
    "batch_size": "batch size",
    "max_length": "max length",
    "lora_r": "LoRA rank",
    "seed": "seed",
}
DATA_COUNTS = ("examples", "empty_responses_dropped", "duplicates_dropped", "split")


def library_version() -> str:
    try:
        return metadata.version("demoalign")
    except metadata.PackageNotFoundError:
        return "unknown"


def _value(v) -> str:
    """Figures as metrics.jsonl holds them (a float's shortest exact form)."""
    if isinstance(v, float):
        return repr(v)
    return "" if v is None else str(v).replace("|", "\\|")


def _table(rows: list[tuple[str, object]], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    return lines + [f"| {k} | {_value(v)} |" for k, v in rows]


def _front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a model card; ({}, text) when it has no front matter."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}, text
    try:
        meta = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError:
        return {}, text
    return (meta if isinstance(meta, dict) else {}), text[end + 5 :]


def is_demoalign_card(text: str) -> bool:
    return TAG in (split_card(text)[0].get("tags") or [])


def last_step(records: list[dict], **context) -> dict | None:
    """The last optimiser-step record (one with a loss) whose keys match `context`."""
    steps = [
        r
        for r in records
        if "loss" in r and "event" not in r and all(r.get(k) == v for k, v in context.items())
    ]
    return steps[-1] if steps else None


def _event(records: list[dict], name: str, **context) -> dict | None:
    found = [
        r
        for r in records
        if r.get("event") == name and all(r.get(k) == v for k, v in context.items())
    ]
    return found[-1] if found else None


def _data_section(config: dict, records: list[dict]) -> list[str]:
    start = _event(records, "run_start") or {}
    rows: list[tuple[str, object]] = [("data", config.get("data", ""))]
    if config.get("columns"):
        rows.append(("columns", config["columns"]))
    if config.get("max_examples"):
        rows.append(("max_examples", config["max_examples"]))
    rows += [(k, start[k]) for k in DATA_COUNTS if k in start]
    data = _event(records, "data") or {}  # what the encoder cut (SFT)
    rows += [(k, v) for k, v in data.items() if k != "event"]
    return ["## Data", "", *_table(rows, ("item", "value")), ""]


def _settings_section(config: dict) -> list[str]:
    rows = [(label, config[key]) for key, label in SETTINGS.items() if key in config]
    full = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip()
    return [
        "## Training settings",
        "",
        *_table(rows, ("setting", "value")),
        "",
        "<details><summary>every setting (the run's config.yaml)</summary>",
        "",
        "```yaml",
        full,
        "```",
        "",
        "</details>",
        "",
    ]


def _figures(title: str, record: dict | None) -> list[str]:
    if not record:
        return []
    rows = [(k, v) for k, v in record.items() if k != "event"]
    return [f"### {title}", "", *_table(rows, ("metric", "value")), ""]


def render_card(meta: dict, title: str, intro: str, sections: list[list[str]]) -> str:
    lines = [f"# {title}", "", intro, ""]
    for section in sections:
        lines += section
    return _front_matter(meta) + "\n" + "\n".join(lines).rstrip() + "\n"


def policy_card(config: dict, records: list[dict], run_end: dict) -> str:
    """final/'s card: `config` as in config.yaml, `records` of metrics.jsonl, and the run_end
    record (written to metrics.jsonl once final/ is in place)."""
    method = config.get("method", "")
    meta = {
        "base_model": config.get("model", ""),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [TAG, method],
    }
    intro = (
        f"Fine-tuned from `{config.get('model', '')}` by {METHODS.get(method, method)}, "
        f"with demoalign {library_version()}."
    )
    figures = ["## Training results", ""]
    figures += _figures("last optimiser step", last_step(records))
    figures += _figures("run end", run_end)
    return render_card(
        meta,
        f"{method.upper()} model",
        intro,
        [_settings_section(config), _data_section(config, records), figures],
    )


def reward_model_card(config: dict, records: list[dict], iteration: int) -> str:
    """iterations/<k>/reward_model/'s card (RFT): the reward steps of iteration k and its
    reward_eval record (accuracies and margins before and after those steps)."""
    start = config.get("reward_model") or config.get("model", "")
    meta = {
        "base_model": start,
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": [TAG, "rft", "reward-model"],
    }
    intro = (
        f"Reward model of RFT outer iteration {iteration} (one score per sequence, "
        f"AutoModelForSequenceClassification with num_labels=1), started from `{start}` and "
        f"trained on demonstrations against the policy's negatives, with demoalign "
        f"{library_version()}. It reads the policy's token ids."
    )
    figures = [f"## Training results (iteration {iteration})", ""]
    figures += _figures("last reward step", last_step(records, phase="reward", iteration=iteration))
    figures += _figures("reward evaluation", _event(records, "reward_eval", iteration=iteration))
    return render_card(
        meta,
        f"RFT reward model, iteration {iteration}",
        intro,
        [_settings_section(config), _data_section(config, records), figures],
    )


def with_eval_figures(card: str, entry: dict, source: dict) -> str:
    """`card` with its evaluation section replaced by `entry` (one model of results.json:
    `metrics`, and `vs_baseline` where there is a baseline); `source` says which evaluation
    (output_dir, pairs, ...)."""
    body = card.split(EVAL_MARKER)[0].rstrip() + "\n"
    lines = ["", EVAL_MARKER, "", "## Evaluation (demoalign eval)", ""]
    lines += [f"- {k}: `{v}`" for k, v in source.items() if v not in ("", None)]
    lines += ["", *_interval_table(entry.get("metrics", {}), "value")]
    deltas = entry.get("vs_baseline") or {}
    if deltas:
        lines += ["", "Difference from the baseline (paired over the same items):", ""]
        lines += _interval_table(deltas, "Δ")
    return body + "\n".join(lines) + "\n"


def _interval_table(figures: dict, value: str) -> list[str]:
    lines = [f"| metric | {value} | low | high |", "| --- | --- | --- | --- |"]
    for name, m in figures.items():
        cells = " | ".join(_value(m[k]) for k in ("value", "low", "high"))
        lines.append(f"| {name} | {cells} |")
    return lines


def read_records(path: str | Path) -> list[dict]:
    """metrics.jsonl's records ([] when there is none yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def record_eval(model_dir: str | Path, entry: dict, source: dict) -> bool:
    """Rewrite the card of `model_dir` with its evaluation figures, atomically, when the folder
    has a demoalign card; returns whether it had one."""
    path = Path(model_dir) / "README.md"
    try:
        card = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not is_demoalign_card(card):
        return False
    atomic_write_text(path, with_eval_figures(card, entry, source))
    return True
