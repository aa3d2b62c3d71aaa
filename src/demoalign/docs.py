"""The option reference of docs/options.md, generated from the config dataclasses (`make docs`
rewrites the block between START and END in that file; a test checks that it is current)."""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

from .config import (
    DemoConfig,
    EvalConfig,
    GenerateConfig,
    IRFTConfig,
    RFTConfig,
    SFTConfig,
    TrainConfig,
    option_docs,
)

START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def _table(cls, only=None) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in option_docs(cls):
        if only is None or key in only:
            rows.append(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
    return rows


def reference_markdown() -> str:
    base = {f.name for f in fields(TrainConfig)}
    lines = [
        "### Common to `sft`, `spin`, `irft`, `rft`",
        "",
        *_table(TrainConfig),
        "",
        "### `sft` only (and its own default)",
        "",
        *_table(SFTConfig, {"epochs", "learning_rate"}),
        "",
        "### `irft` and `spin`",
        "",
        *_table(IRFTConfig, {f.name for f in fields(IRFTConfig)} - base),
        "",
        "`spin` is `irft` with `stages` fixed at 1; `iterations` is the number of SPIN iterations.",
        "",
        "### `rft`",
        "",
        *_table(RFTConfig, {f.name for f in fields(RFTConfig)} - base),
        "",
        "`rft` also reads the common options; `learning_rate` is the policy's.",
        "",
        "### `generate`",
        "",
        *_table(GenerateConfig),
        "",
        "### `eval`",
        "",
        *_table(EvalConfig),
        "",
        "### `demo`",
        "",
        *_table(DemoConfig),
    ]
    return "\n".join(lines)


OPTIONS_PAGE = "docs/options.md"


def update_reference(path: str | Path = OPTIONS_PAGE) -> None:
    path = Path(path)
    text = path.read_text()
    if START not in text or END not in text:
        # Without the markers the substitution would silently leave the page stale.
        raise SystemExit(f"{path} has no {START} ... {END} block to rewrite")
    block = f"{START}\n{reference_markdown()}\n{END}"
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    path.write_text(new)


if __name__ == "__main__":
    update_reference(sys.argv[1] if len(sys.argv) > 1 else OPTIONS_PAGE)
