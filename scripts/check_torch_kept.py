"""Does `pip install PROJECT` keep the torch already installed? Asks pip itself, without
installing anything: `pip install --dry-run --report - PROJECT` in the running interpreter's
environment, then looks for torch in what pip would install.

    python scripts/check_torch_kept.py                  # this project, this venv
    python scripts/check_torch_kept.py --extras test,eval,gguf,tracking

Exit status: 0 torch is kept (the line `torch kept: ...`), 1 pip would install torch (the line
names the version it would bring), 2 pip could not resolve (no package index reachable, or a
requirement it cannot find): nothing was decided. demoalign depends on `torch>=2.11`, never a
pin, so that the user's own torch build (CUDA, ROCm, CPU) stays; tests/test_packaging.py runs
this and skips on status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pip's messages when it could not reach an index or find a distribution there.
UNREACHABLE = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "ConnectionError",
    "Could not fetch URL",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Read timed out",
)


def dry_run(project: Path, extras: str = "", python: str = sys.executable) -> tuple[int, dict, str]:
    """(pip's exit status, its installation report, its stderr) for installing `project`."""
    target = str(project) + (f"[{extras}]" if extras else "")
    cmd = [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", target]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=project)
    report = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


def would_install(report: dict) -> dict[str, str]:
    """{normalised name: version} of every distribution the report would install."""
    return {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in report.get("install", [])
    }


def check(project: Path, extras: str = "") -> tuple[int, str]:
    """(exit status, one line) as described in the module docstring."""
    try:
        installed = metadata.version("torch")
    except metadata.PackageNotFoundError:
        installed = None
    status, report, stderr = dry_run(project, extras)
    if status != 0:
        last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        if any(marker in stderr for marker in UNREACHABLE):
            return 2, f"undecided: pip could not resolve ({last.strip()})"
        raise RuntimeError(f"pip install --dry-run failed (status {status}):\n{stderr}")
    plan = would_install(report)
    if "torch" in plan:
        return 1, f"torch replaced: pip would install torch {plan['torch']} over {installed}"
    others = ", ".join(f"{k} {v}" for k, v in sorted(plan.items())) or "nothing"
    return 0, f"torch kept: {installed} stays; pip would install {others}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "project", nargs="?", default=str(ROOT), help="project folder (default: this one)"
    )
    parser.add_argument("--extras", default="", help="comma list of extras to include")
    args = parser.parse_args(argv)
    status, line = check(Path(args.project), args.extras)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
