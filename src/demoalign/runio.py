"""The run folder: refusing to clobber, atomic writes, and the metrics log."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml


def prepare_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Create the run folder. A non-empty folder is refused unless `overwrite`, and even then only
    a previous run folder (it holds config.yaml) is cleared: a rerun never appends to old data."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=true to replace it")
        if not (out / "config.yaml").exists():
            raise FileExistsError(f"{out} is not empty and holds no config.yaml; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_jsonl(path: str | Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_write_yaml(path: str | Path, data: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def save_pretrained_atomic(model, tokenizer, path: str | Path) -> None:
    """save_pretrained into a temporary folder, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl, one JSON object per line, flushed as it goes (it is a log, read while the
    run is alive; the folder was emptied before the run, so nothing old is appended to)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._fh = open(path, "w", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._fh:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
