"""The paper's six leaderboard tasks through lm-evaluation-harness (the optional extra
`pip install 'demoalign[eval]'`, lm-eval 0.4.13), read from LOCAL files only.

Each task is lm-eval's own registered config (prompt, choices, metric, filters) with the data
source replaced by the local copy under $DEMOALIGN_DATA (or `leaderboard_data`), mapped to the
schema
the config expects. Nothing is downloaded. Per-item scores come back from lm-eval's logged samples
and get the same bootstrap interval as every other figure of `demoalign eval`.

Task (lm-eval config): metric, shots; local data (few-shot pool):
- arc_easy: acc_norm, 25; arc/arc_easy.jsonl (pool: the same file, the item itself excluded)
- arc_challenge: acc_norm, 25; arc/arc_challenge.jsonl (pool: arc/arc_easy.jsonl; ARC's train
  split is not local)
- truthfulqa_mc2: acc (mc2), 0; truthfulqa/mc_task.json
- winogrande: acc, 5; winogrande/winogrande.jsonl, xl validation (pool: the same file, the item
  itself excluded)
- gsm8k: exact_match strict-match, 5; gsm8k/test.jsonl (pool: gsm8k/train.jsonl)
- hellaswag: acc_norm, 10; hellaswag/hellaswag_val_full.txt.bz2, validation (pool: the same
  file, the item excluded)
- mmlu (mmlu_<subject> ×57): acc pooled over items, `mmlu_shots` (≤ 4); mmlu/mmlu_dev_dataset,
  5 dev questions per subject (pool: the subject's other dev questions, first n)
"""

from __future__ import annotations

import bz2
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..config import parse_leaderboard_tasks as parse_tasks  # noqa: F401  (evaluate's name)

# Every task of config's LEADERBOARD_TASKS (the names a config may give; tests/test_config.py
# checks the two agree): (metric key in lm-eval's samples, filter, default shots).
TASKS = {
    "arc_easy": ("acc_norm", "none", 25),
    "arc_challenge": ("acc_norm", "none", 25),
    "truthfulqa_mc2": ("acc", "none", 0),
    "winogrande": ("acc", "none", 5),
    "gsm8k": ("exact_match", "strict-match", 5),
    "hellaswag": ("acc_norm", "none", 10),
    "mmlu": ("acc", "none", 4),
}
INSTALL_HINT = "pip install 'demoalign[eval]'  (lm-eval==0.4.13)"


class MissingExtra(ImportError):
    pass


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"the leaderboard tasks need lm-evaluation-harness, an optional extra: {INSTALL_HINT} "
            f"({exc})"
        ) from None
    return lm_eval


# ---------------------------------------------------------------- local data in lm-eval's schemas


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found (set leaderboard_data to the folder holding arc/, gsm8k/, …)"
        )
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _arc(rec: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(rec["choices"]))]
    question = rec["query"].removeprefix("Question:").strip()
    return {
        "question": question,
        "choices": {"text": rec["choices"], "label": labels},
        "answerKey": labels[rec["gold"]],
    }


def _hellaswag(path: Path) -> list[dict]:
    """llama.cpp's text form: per item 6 lines: 'activity: context', gold index, 4 endings
    (already through lm-eval's preprocessing of the query)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    out = []
    for i in range(0, len(lines) - 5, 6):
        out.append(
            {"query": lines[i], "label": lines[i + 1].strip(), "choices": lines[i + 2 : i + 6]}
        )
    return out


@lru_cache(maxsize=None)
def _mmlu(root: str) -> dict[str, list[dict]]:
    import datasets

    ds = datasets.load_from_disk(str(Path(root) / "mmlu" / "mmlu_dev_dataset"))
    by_subject: dict[str, list[dict]] = {}
    for rec in ds:
        doc = {
            "question": rec["question"],
            "subject": rec["subject"],
            "choices": rec["choices"],
            "answer": int(rec["answer"]),
        }
        docs = by_subject.setdefault(rec["subject"], [])
        if doc not in docs:  # college_physics's dev split holds one question twice
            docs.append(doc)
    return by_subject


def _splits(**splits):
    import datasets

    return lambda **_: datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    )


@lru_cache(maxsize=1)
def _manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes lm-eval's task folder: a few seconds, so once per process


_DATA_KEYS = (
    "tag",
    "group",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
)  # replaced by local splits


def _official(task: str, shots: int) -> dict:
    manager = _manager()
    cfg = dict(manager._factory._load_full_config(manager._entry(task), None))
    for key in _DATA_KEYS:
        cfg.pop(key, None)
    cfg["num_fewshot"] = shots
    return cfg


def _local(task: str, shots: int, test_split: str, fewshot_split: str | None, **splits) -> dict:
    """lm-eval's config of `task` reading `splits` (name: records) instead of its hub data."""
    cfg = {**_official(task, shots), "custom_dataset": _splits(**splits), "test_split": test_split}
    if fewshot_split:
        cfg["fewshot_split"] = fewshot_split
    return cfg


def _arc_challenge(root: Path, shots: int) -> list[dict]:
    test = [_arc(r) for r in _jsonl(root / "arc" / "arc_challenge.jsonl")]
    pool = [_arc(r) for r in _jsonl(root / "arc" / "arc_easy.jsonl")]
    return [_local("arc_challenge", shots, "test", "train", test=test, train=pool)]


def _arc_easy(root: Path, shots: int) -> list[dict]:
    docs = [_arc(r) for r in _jsonl(root / "arc" / "arc_easy.jsonl")]
    # test_split = fewshot_split makes lm-eval exclude the item itself from its examples.
    return [_local("arc_easy", shots, "test", "test", test=docs)]


def _truthfulqa_mc2(root: Path, shots: int) -> list[dict]:
    raw = json.loads((root / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    docs = [
        {
            "question": r["question"],
            "mc2_targets": {
                "choices": list(r["mc2_targets"]),
                "labels": list(r["mc2_targets"].values()),
            },
        }
        for r in raw
    ]
    cfg = _local("truthfulqa_mc2", shots, "validation", None, validation=docs)
    cfg["validation_split"] = cfg.pop("test_split")
    return [cfg]


def _winogrande(root: Path, shots: int) -> list[dict]:
    docs = [
        {
            "context_options": r["context_options"],
            "continuation": r["continuation"],
            "gold": int(r["gold"]),
        }
        for r in _jsonl(root / "winogrande" / "winogrande.jsonl")
    ]
    # test_split = fewshot_split makes lm-eval exclude the item itself from its examples.
    cfg = _local("winogrande", shots, "validation", "validation", validation=docs)
    cfg.update(doc_to_text=_wg_text, doc_to_choice=_wg_choice, doc_to_target=_wg_target)
    return [cfg]


def _gsm8k(root: Path, shots: int) -> list[dict]:
    test, train = _jsonl(root / "gsm8k" / "test.jsonl"), _jsonl(root / "gsm8k" / "train.jsonl")
    return [_local("gsm8k", shots, "test", "train", test=test, train=train)]


def _hellaswag_configs(root: Path, shots: int) -> list[dict]:
    docs = _hellaswag(root / "hellaswag" / "hellaswag_val_full.txt.bz2")
    cfg = _local("hellaswag", shots, "validation", "validation", validation=docs)
    cfg.pop("process_docs", None)  # the local text is already processed
    return [cfg]


def _mmlu_configs(root: Path, shots: int) -> list[dict]:
    if shots > 4:
        raise ValueError(
            "mmlu_shots must be <= 4: only MMLU's dev split (5 questions per "
            "subject) is local, and the question being asked is never its own example"
        )
    # A subject with fewer than 5 distinct dev questions gets at most all its others as examples
    # (lm-eval leaves out every copy of the question asked, and refuses a larger request).
    return [
        _local(f"mmlu_{subject}", min(shots, len(docs) - 1), "dev", "dev", dev=docs)
        for subject, docs in sorted(_mmlu(str(root)).items())
    ]


_BUILDERS = {
    "arc_easy": _arc_easy,
    "arc_challenge": _arc_challenge,
    "truthfulqa_mc2": _truthfulqa_mc2,
    "winogrande": _winogrande,
    "gsm8k": _gsm8k,
    "hellaswag": _hellaswag_configs,
    "mmlu": _mmlu_configs,
}


def task_configs(name: str, root: Path, shots: int) -> list[dict]:
    """lm-eval's registered config(s) for `name` with the data source replaced by local files."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown leaderboard task {name!r}; choose from {', '.join(_BUILDERS)}")
    return _BUILDERS[name](root, shots)


def _wg_text(doc):
    return doc["gold"]


def _wg_choice(doc):
    return doc["context_options"]


def _wg_target(doc):
    return doc["continuation"]


# ---------------------------------------------------------------- running


@dataclass
class LeaderboardRun:
    """Where the tasks' local files are and how lm-eval runs them: items per task (None = all),
    MMLU's shots, the batch size, the seed and the device."""

    root: Path
    limit: int | None
    mmlu_shots: int
    batch_size: int
    seed: int
    device: object


def run_leaderboard(model, tokenizer, names: list[str], how: LeaderboardRun) -> dict[str, dict]:
    """{task: {"values": per-item scores, "metric", "filter", "num_fewshot", "lm_eval_task"}}."""
    root, limit, mmlu_shots, seed = how.root, how.limit, how.mmlu_shots, how.seed
    batch_size, device = how.batch_size, how.device
    import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    shots = {name: mmlu_shots if name == "mmlu" else TASKS[name][2] for name in names}
    configs = {name: task_configs(name, Path(root), shots[name]) for name in names}
    res = simple_evaluate(
        model=lm,
        tasks=[c for name in names for c in configs[name]],
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="ERROR",
    )
    out = {}
    for name in names:
        metric, filt, _ = TASKS[name]
        values = [
            float(sample[metric])
            for cfg in configs[name]
            for sample in res["samples"][cfg["task"]]
            if sample.get("filter", "none") == filt
        ]
        out[name] = {
            "values": values,
            "metric": metric if filt == "none" else f"{metric},{filt}",
            "num_fewshot": shots[name],
            "lm_eval_task": name if name != "mmlu" else "mmlu_<subject>",
        }
    return out
