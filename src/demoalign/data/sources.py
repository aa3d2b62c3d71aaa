"""Where a run's data comes from: a file, a dataset folder, a hub id (readers.py, hub.py), or a
built-in task written `task:NAME[:SEED]`.

This module is the one reader of that spec. Demonstrations and training preference pairs default
to data seed 0; evaluation pairs default to seed 2, the held-out draw (`eval.demo` evaluates on
it), so an evaluation never scores the pairs a run trained on unless asked to.
"""

from __future__ import annotations

import os
from pathlib import Path

from .examples import load_examples
from .formats import Preference, parse_columns
from .hub import data_ref
from .preferences import load_preference_pairs
from .tasks import get_task, task_examples, task_pairs, task_prompts

DATA_ENV = "DEMOALIGN_DATA"
TASK_PREFIX = "task:"
TRAIN_SEED = 0
HELDOUT_SEED = 2


def parse_task_spec(spec: str, default_seed: int):
    """(task, data seed) of `task:NAME[:SEED]`, or None for anything else (a path)."""
    if not spec.startswith(TASK_PREFIX):
        return None
    name, _, seed = spec[len(TASK_PREFIX) :].partition(":")
    try:
        return get_task(name), int(seed or default_seed)
    except ValueError as exc:
        raise ValueError(
            f"{spec}: expected task:NAME[:SEED] with an integer SEED ({exc})"
        ) from None


def demonstrations(
    spec: str,
    columns: str = "",
    limit: int = 0,
    *,
    data_split: str = "",
    data_config: str = "",
    data_revision: str = "",
) -> tuple[list, str, dict]:
    """(examples, a summary to print, counts to log). A task draws `limit` (default 1000); the
    split, config and revision choose within a hub id or dataset folder (hub.py)."""
    parsed = parse_task_spec(spec, TRAIN_SEED)
    if parsed:
        task, seed = parsed
        examples = task_examples(task.name, limit or 1000, seed=seed)
        return (
            examples,
            (f"built-in task {task.name!r} (data seed {seed}): {len(examples)} demonstrations"),
            {},
        )
    source = data_ref(spec, data_split, data_config, data_revision)
    examples, report = load_examples(source, parse_columns(columns or None), limit or None)
    counts = {
        "empty_responses_dropped": report.n_empty_responses,
        "duplicates_dropped": report.n_duplicates,
    }
    return examples, report.summary(), counts


def preference_pairs(
    spec: str, limit: int | None, default_seed: int, task_count: int
) -> list[Preference]:
    """Preference(Example(prompt, chosen, history), rejected) from a file of pairs, or a task's
    (correct, plausible-wrong) pairs: `limit` or `task_count` of them."""
    parsed = parse_task_spec(spec, default_seed)
    if parsed is None:
        return load_preference_pairs(spec, limit)
    task, seed = parsed
    prompts = task_prompts(task, limit or task_count, seed)
    return task_pairs(task, prompts, seed)


def data_root() -> Path:
    """The folder of local public data (leaderboard tasks, real tokenizer files): the one setting
    DEMOALIGN_DATA (`demoalign eval` also takes `leaderboard_data`). Nothing is downloaded."""
    value = os.environ.get(DATA_ENV)
    if not value:
        raise ValueError(
            f"set {DATA_ENV} to the folder of local data (it holds arc/, gsm8k/, "
            "tokenizers/, ...), or pass leaderboard_data=FOLDER"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ValueError(f"{DATA_ENV}={value}: no such folder")
    return root
