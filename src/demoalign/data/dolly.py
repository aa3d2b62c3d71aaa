"""Human-written demonstrations from databricks-dolly-15k (1000 records under $DEMOALIGN_DATA, in
an Alpaca wrapper), split once into training and disjoint held-out demonstrations."""

from __future__ import annotations

import json
import random
import re
from typing import Callable

from . import Example
from .sources import data_root

DOLLY = "dolly_hhrlhf/dolly_hhrlhf_train_small.jsonl"
_ALPACA = re.compile(r"### Instruction:\n(?P<body>.*)\n\n### Response:\n?$", re.S)


def dolly_examples() -> list[Example]:
    """Dolly records with the Alpaca wrapper stripped: a chat model should see the bare request."""
    out = []
    for line in (data_root() / DOLLY).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        match = _ALPACA.search(rec["prompt"])
        prompt = (match.group("body") if match else rec["prompt"]).strip()
        if prompt and rec["response"].strip():
            out.append(Example(prompt, rec["response"].strip()))
    return out


def split_dolly(
    n_train: int, n_heldout: int, fits: Callable[[Example], bool] | None = None, seed: int = 0
) -> tuple[list, list, dict]:
    """(training, held-out, counts): one fixed shuffle, records that fit the length limits only
    (a demonstration cut short would lose its EOS, a prompt cut from the left its instruction),
    no held-out prompt equal to a training prompt."""
    examples = dolly_examples()
    random.Random(seed).shuffle(examples)
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


def write_jsonl(path, examples: list[Example]) -> None:
    """Examples as a prompt/response JSONL file (a `data=` file of a run)."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n")
