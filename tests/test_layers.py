"""The import layers of docs/architecture.md hold: every module under src/demoalign has a layer,
and no module imports (at module level or inside a function) a module of a higher layer. The
layer table lives only in docs/architecture.md (between its `layers` markers); this test parses
it, so the document cannot drift from what is checked."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "demoalign"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
START, END = "<!-- layers:start -->", "<!-- layers:end -->"


def layer_table() -> dict[str, int]:
    """Pattern (`run`, `eval/*`, `eval/demo`) -> layer number, from docs/architecture.md."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert START in text and END in text, f"{ARCHITECTURE} lost its layer table markers"
    table: dict[str, int] = {}
    for row in text.split(START, 1)[1].split(END, 1)[0].splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue  # the header and separator rows
        for pattern in re.findall(r"`([^`]+)`", cells[2]):
            assert pattern not in table, f"{pattern} is placed twice in {ARCHITECTURE}"
            table[pattern] = int(cells[0])
    assert table, f"no layer rows found in {ARCHITECTURE}"
    return table


def module_key(path: Path) -> str:
    """src/demoalign/eval/demo.py -> 'eval/demo'; data/__init__.py -> 'data/__init__'."""
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def layer_of(key: str, table: dict[str, int]) -> int | None:
    """An exact entry wins over its package's `pkg/*`; a package's __init__ counts as the package
    itself too (so `generation` places generation/__init__.py)."""
    if key in table:
        return table[key]
    if key.endswith("/__init__") and key[: -len("/__init__")] in table:
        return table[key[: -len("/__init__")]]
    package = key.rsplit("/", 1)[0] if "/" in key else None
    return table.get(f"{package}/*") if package else None


def all_modules() -> dict[str, Path]:
    """Dotted name (demoalign.eval.demo, demoalign.data for data/__init__.py) -> file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["demoalign", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # dotted name of the demoalign module imported


def _own_package(dotted: str, path: Path) -> list[str]:
    parts = dotted.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def demoalign_imports(dotted: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a demoalign module in the file, wherever it stands (`ast.walk` visits
    function bodies, conditionals and TYPE_CHECKING blocks alike)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [
                Import(node.lineno, alias.name)
                for alias in node.names
                if alias.name.split(".")[0] == "demoalign"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _own_package(dotted, path)[
                    : len(_own_package(dotted, path)) - node.level + 1
                ]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "demoalign":
                source = node.module
            else:
                continue
            for alias in node.names:
                # `from . import irft` imports the module demoalign.methods.irft itself.
                child = f"{source}.{alias.name}"
                found.append(Import(node.lineno, child if child in modules else source))
    return found


def resolve(target: str, modules: dict[str, Path]) -> str:
    """The longest module name that `target` starts with (an import of a name that is not a
    module, or of a module that does not exist, is charged to the module that holds it)."""
    parts = target.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or "demoalign"


def test_every_module_has_a_layer():
    table = layer_table()
    unplaced = [
        str(path.relative_to(ROOT))
        for path in all_modules().values()
        if layer_of(module_key(path), table) is None
    ]
    assert not unplaced, (
        f"modules without a layer: {unplaced}; give each a row entry in {ARCHITECTURE.name}'s "
        "layer table"
    )


def test_no_module_imports_a_higher_layer():
    table = layer_table()
    modules = all_modules()
    violations = []
    for dotted, path in modules.items():
        own = layer_of(module_key(path), table)
        if own is None:
            continue  # reported by test_every_module_has_a_layer
        for imp in demoalign_imports(dotted, path, modules):
            target = resolve(imp.target, modules)
            theirs = layer_of(module_key(modules[target]), table)
            if theirs is not None and theirs > own:
                violations.append(
                    f"{path.relative_to(ROOT)}:{imp.line}: layer {own} ({dotted}) imports "
                    f"layer {theirs} ({target})"
                )
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


def test_foundations_import_no_torch_at_module_level():
    table = layer_table()
    offenders = []
    for path in all_modules().values():
        if layer_of(module_key(path), table) != 1:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "torch" for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"layer-1 modules import torch at module level: {offenders}"


# Run in a fresh interpreter: reports which demoalign file first pulled torch in.
_WHO_IMPORTS_TORCH = """
import sys, traceback

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            chain = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                     if "demoalign" in f.filename]
            print("torch imported through:", " <- ".join(reversed(chain)))
        return None

sys.meta_path.insert(0, Spy())
import demoalign.cli
print("torch loaded:", "torch" in sys.modules)
"""


def test_importing_the_cli_does_not_import_torch():
    """`demoalign --help` and argument errors must not pay torch's import (seconds)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        [sys.executable, "-c", _WHO_IMPORTS_TORCH],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "torch loaded: False" in result.stdout, result.stdout
