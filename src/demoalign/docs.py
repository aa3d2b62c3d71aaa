"""The option reference of docs/options.md, generated from the method registry and the config
dataclasses (`make docs`
rewrites the block between START and END in that file; a test checks that it is current)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .config import DemoConfig, EvalConfig, GenerateConfig, TrainConfig, option_docs
from .methods import METHODS, Method

START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def _table(cls, only=None) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in option_docs(cls):
        if only is None or key in only:
            rows.append(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
    return rows


def _own_options(cls, parent) -> set[str]:
    """The options `cls` adds to `parent`, or gives another default."""
    inherited = {key: default for key, default, _ in option_docs(parent)}
    return {key for key, default, _ in option_docs(cls) if inherited.get(key) != default}


def _method_section(method: Method) -> list[str]:
    """A method's section: what it is (its config's docstring), then only what it adds to, or
    changes in, the config it builds on (the common options, or another method's)."""
    cls = method.config_class
    others = {m.config_class: m.name for m in METHODS.values()}
    parent = next(c for c in cls.__mro__[1:] if c in others or c is TrainConfig)
    written = cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(")  # not dataclass's
    about = " ".join((cls.__doc__ if written else method.help).split())
    lines = [f"### `{method.name}`", "", about, ""]
    own = _own_options(cls, parent)
    if not own:
        return lines + [f"Its options are those of `{others[parent]}`.", ""]
    return lines + [*_table(cls, own), ""]


def reference_markdown() -> str:
    lines = [
        f"### Common to {', '.join(f'`{name}`' for name in METHODS)}",
        "",
        *_table(TrainConfig),
        "",
    ]
    for method in METHODS.values():
        lines += _method_section(method)
    for command, cls in (("generate", GenerateConfig), ("eval", EvalConfig), ("demo", DemoConfig)):
        lines += [f"### `{command}`", "", *_table(cls), ""]
    return "\n".join(lines[:-1])


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
