"""The run folder: what may be replaced, the lock, the run state, atomic writes, the metrics log.

A run folder is one this package created: it holds the marker file `.demoalign-run`. Only such a
folder is ever cleared by `overwrite=true`, never the working directory or a parent of it, and
never a folder that holds one of the run's own inputs. Everything is checked before anything is
created or deleted (`check_output_dir`), then `claim_output_dir` takes the lock and clears.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import yaml

from .config import RESUME_MAY_DIFFER

MARKER = ".demoalign-run"
LOCK = ".lock"
STATE = "run_state.json"


class RunFolderError(ValueError):
    """An output folder that cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------- checks (no side effects)


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_unsafe_target(out: Path, inputs: list[str]) -> None:
    cwd = Path.cwd().resolve()
    if _is_inside(cwd, out):
        raise RunFolderError(
            f"output_dir {out} is the working directory or a parent of it; "
            "refusing to replace it (choose a new folder, e.g. runs/NAME)"
        )
    for item in inputs:
        if item and _is_inside(Path(item).expanduser().resolve(), out):
            raise RunFolderError(
                f"output_dir {out} holds this run's input {item}; "
                "refusing to replace it (write the run to another folder)"
            )


def check_output_dir(path: str | Path, overwrite: bool, inputs: list[str] = ()) -> Path:
    """Raise RunFolderError unless `path` can be (re)used as a run folder; changes nothing.
    `inputs`: the run's input paths (model, data, ...) that must survive an overwrite."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir {path} exists and is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise RunFolderError(
            f"{path} exists and is not empty; pass overwrite=true to replace "
            "a previous run there, or choose another output_dir"
        )
    if not (out / MARKER).exists():
        raise RunFolderError(
            f"{path} is not a demoalign run folder (no {MARKER} marker); refusing to delete it"
        )
    _refuse_unsafe_target(out, list(inputs))
    owner = live_lock_owner(out)
    if owner:
        raise RunFolderError(
            f"{path} is in use by a live run ({owner}); wait for it to end, or "
            f"delete {out / LOCK} if you know that run is gone"
        )
    return out


# ---------------------------------------------------------------- the lock


def _read_lock(folder: Path) -> dict | None:
    try:
        return json.loads((folder / LOCK).read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def live_lock_owner(folder: Path) -> str | None:
    """'pid P on HOST' of a live lock holder, or None. A lock of a dead process on this host is
    stale; one from another host cannot be checked and counts as live."""
    lock = _read_lock(folder)
    if lock is None:
        return None
    if lock.get("host") == socket.gethostname() and not _pid_alive(int(lock.get("pid", -1))):
        return None
    return f"pid {lock.get('pid')} on {lock.get('host')}"


def _take_lock(folder: Path) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    for _ in range(2):
        try:
            fd = os.open(folder / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = live_lock_owner(folder)
            if owner:
                raise RunFolderError(f"{folder} is in use by a live run ({owner})") from None
            (folder / LOCK).unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(record)
        return
    raise RunFolderError(f"could not lock {folder}")


def release_lock(folder: str | Path) -> None:
    lock = _read_lock(Path(folder))
    if lock and lock.get("pid") == os.getpid():
        (Path(folder) / LOCK).unlink(missing_ok=True)


def check_resume(
    path: str | Path,
    config: dict,
    ignored=RESUME_MAY_DIFFER,
    defaults: dict | None = None,
):
    """For resume=true: the run folder to continue, or None when there is no run there yet (the
    run starts as a new one). Raises RunFolderError when the folder is not a demoalign run folder,
    is held by a live run, or was made with another config (`ignored` keys may differ). A key
    that the saved config lacks matches its value in `defaults`: an option added by a later
    version of demoalign, left at its default, does not stop a run begun before it."""
    out = Path(path).expanduser().resolve()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    check_output_dir(path, overwrite=True)  # a run folder, not a file, not locked by a live run
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RunFolderError(
            f"cannot resume {path}: its config.yaml is unreadable ({exc})"
        ) from None
    saved = {**{k: v for k, v in (defaults or {}).items() if k in config}, **saved}
    keys = (set(saved) | set(config)) - set(ignored)
    differ = sorted(k for k in keys if saved.get(k, "<absent>") != config.get(k, "<absent>"))
    if differ:
        detail = ", ".join(
            f"{k}: {saved.get(k, '<absent>')!r} there, {config.get(k, '<absent>')!r} now"
            for k in differ[:5]
        )
        raise RunFolderError(
            f"cannot resume {path}: the config differs from the run's config.yaml ({detail}); "
            "rerun with the same config, or use another output_dir"
        )
    return out


def claim_output_dir(
    path: str | Path, overwrite: bool, inputs: list[str] = (), resume: bool = False
) -> Path:
    """Check, create, lock, and clear (only on overwrite of a checked run folder) the run folder.
    The lock is taken before anything is deleted, so a live run's files are never removed.
    `resume`: take the lock of a run folder (checked by `check_resume`) and clear nothing."""
    out = check_output_dir(path, overwrite or resume, inputs)
    out.mkdir(parents=True, exist_ok=True)
    _take_lock(out)
    if resume:
        return out
    for entry in out.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    atomic_write_text(out / MARKER, json.dumps({"created": time.time()}) + "\n")
    return out


# ---------------------------------------------------------------- run state


def write_run_state(folder: str | Path, state: str, **details) -> None:
    """run_state.json: running, failed (with the error) or finished."""
    record = {"state": state, "time": time.time(), **details}
    atomic_write_text(Path(folder) / STATE, json.dumps(record, indent=2) + "\n")


def read_run_state(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / STATE).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    mkstemp creates 0600; the file gets the mode an ordinary open() would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(record: dict) -> str:
    """JSON without bare NaN/Infinity (not JSON): non-finite floats become null."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    return json.dumps(clean, ensure_ascii=False, allow_nan=False)


def atomic_write_jsonl(path: str | Path, records) -> None:
    atomic_write_text(path, "".join(strict_json(r) + "\n" for r in records))


def atomic_write_yaml(path: str | Path, data: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def save_pretrained_atomic(model, tokenizer, path: str | Path, card: str | None = None) -> None:
    """save_pretrained into a temporary folder, then rename it into place; `card` (a model
    card, modelcard.py) goes in as README.md before the rename, so it is there with the model."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl, one strict-JSON object per line, flushed as it goes (it is a log, read while
    the run is alive). A new run starts it empty; a resumed run cuts it back to `resume_at` bytes
    (its length when the checkpoint was written) and appends, so no record appears twice.
    `sink` (tracking.TrackerSink: `log(record)`, `close()`) gets every record written too: the
    one place where the trackers of `report_to` are fed."""

    def __init__(
        self, path: str | Path, enabled: bool = True, resume_at: int | None = None, sink=None
    ):
        self.enabled = enabled
        self.sink = sink if enabled else None
        self.on_step = None  # called for every optimiser-step record (a phase's progress bar)
        self._fh = None
        if enabled and resume_at is not None:
            with open(path, "ab") as fh:
                fh.truncate(resume_at)
            self._fh = open(path, "a", encoding="utf-8")
        elif enabled:
            self._fh = open(path, "w", encoding="utf-8")

    def size(self) -> int:
        """Bytes written so far (everything is flushed)."""
        return os.fstat(self._fh.fileno()).st_size if self._fh else 0

    def write(self, record: dict) -> None:
        if self._fh:
            self._fh.write(strict_json(record) + "\n")
            self._fh.flush()
        if self.sink is not None:
            self.sink.log(record)
        if self.on_step is not None and "step" in record:
            self.on_step()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None
