"""`pip install .` keeps the torch that is installed (demoalign depends on a torch range, never a
pin), asked of pip itself (scripts/check_torch_kept.py: a dry run, nothing installed). pip needs
a package index for the build backend: without one the tests skip, they do not fail."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "check_torch_kept", ROOT / "scripts/check_torch_kept.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _decided(status: int, line: str) -> None:
    if status == 2:
        pytest.skip(line)


def test_pyproject_asks_for_a_torch_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["dependencies"]
    torch = [d for d in deps if re.match(r"torch\b", d)]
    assert torch == ["torch>=2.11"], torch  # a minimum, no == pin and no upper bound


def test_pip_install_keeps_the_installed_torch():
    status, line = _script().check(ROOT)
    _decided(status, line)
    assert status == 0, line
    assert line.startswith("torch kept:")


@pytest.mark.slow
def test_a_pinned_torch_would_be_replaced(tmp_path):
    """The check can fail: the same project with torch pinned to another release than the
    installed one makes pip bring that torch."""
    from importlib import metadata

    installed = metadata.version("torch").split("+")[0]
    other = "2.12.0" if installed != "2.12.0" else "2.11.0"
    project = tmp_path / "project"
    (project / "src" / "demoalign").mkdir(parents=True)
    (project / "src" / "demoalign" / "__init__.py").write_text("")
    shutil.copy(ROOT / "README.md", project / "README.md")
    text = (ROOT / "pyproject.toml").read_text("utf-8")
    assert '"torch>=2.11"' in text
    (project / "pyproject.toml").write_text(text.replace('"torch>=2.11"', f'"torch=={other}"'))
    status, line = _script().check(project)
    _decided(status, line)
    assert status == 1, line
    assert f"torch {other}" in line
