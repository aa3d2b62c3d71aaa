"""Readers: JSONL (.gz), JSON, CSV, Parquet, saved HF datasets, dataset repository folders and hub
ids (hub.py), as (position, record)."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError
from .hub import DataRef, choose_split, data_ref, load_split, looks_like_hub_id

FILE_FORMATS = ("jsonl", "json", "parquet", "csv", "hf_dataset", "dataset_repo", "hub")


def detect_file_format(path: Path) -> str:
    if path.is_dir():
        return "hf_dataset"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise DataError(
        path,
        f"unknown file extension {''.join(path.suffixes) or '(none)'!r}; expected .jsonl, "
        ".jsonl.gz, .json, .parquet, .csv or a folder saved with datasets.save_to_disk",
    )


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _first_non_utf8_line(path: Path) -> int | None:
    """The decoder reports a byte offset within its buffer; users need the line."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return lineno
    except (OSError, EOFError):
        return None
    return None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"invalid JSON ({exc})", line=lineno) from None
            yield lineno, rec


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as fh:
        text = fh.read()
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved under a .json name
            yield from _iter_jsonl(path)
            return
        raise DataError(path, f"invalid JSON ({exc})") from None
    if isinstance(data, dict):
        for key in ("data", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(
                path,
                "expected a JSON list of records or an object with a 'data' or 'train' "
                f"list; found an object with keys {sorted(data)}",
            )
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of records, found {type(data).__name__}")
    for i, rec in enumerate(data, start=1):
        yield i, rec


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        for i, row in enumerate(reader, start=1):
            row.pop(None, None)  # extra cells beyond the header
            yield i, row


def _iter_parquet(path: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several error types
        raise DataError(path, f"cannot read parquet file ({exc})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            i += 1
            yield i, rec
            if limit is not None and i >= limit:
                return


def _load_saved(ref: DataRef) -> tuple[Any, DataRef, list[str]]:
    """(dataset, ref with its split, notes) of a folder written by save_to_disk."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(ref, f"reading a dataset folder needs `datasets` ({exc})") from None
    try:
        ds = datasets.load_from_disk(str(Path(ref.path).expanduser()))
    except Exception as exc:
        raise DataError(
            ref, f"folder is not a dataset saved with datasets.save_to_disk ({exc})"
        ) from None
    notes = _ignored(ref, ("config", "revision"))
    if not isinstance(ds, datasets.DatasetDict):
        return ds, ref, notes + _ignored(ref, ("split",))
    split = choose_split(ref, list(ds.keys()))
    return ds[split], DataRef(ref.path, split), notes


def _ignored(ref: DataRef, keys: tuple[str, ...]) -> list[str]:
    named = [f"data_{key}={getattr(ref, key)}" for key in keys if getattr(ref, key)]
    return [f"{', '.join(named)} ignored: this source has no such choice"] if named else []


def _iter_dataset(ds: Any, limit: int | None) -> Iterator[tuple[int, Any]]:
    n = len(ds) if limit is None else min(limit, len(ds))
    if n < len(ds):
        ds = ds.select(range(n))
    for i, rec in enumerate(ds, start=1):
        yield i, rec


@dataclass
class Source:
    """An opened data option: what errors and reports call it, how it is read, and for the kinds
    read through `datasets` the chosen split itself."""

    ref: DataRef
    kind: str
    notes: list[str] = field(default_factory=list)
    dataset: Any = None

    @property
    def unit(self) -> str:
        """What an error position is called."""
        return "line" if self.kind == "jsonl" else "record"


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_source(spec: Any, limit: int | None = None) -> Source:
    """The Source of a data option (a file, a folder, a hub id, with an `@CONFIG:SPLIT` suffix or
    a DataRef), with `limit` checked. A hub id or dataset folder is loaded here (hub.py)."""
    if isinstance(spec, Source):
        return spec
    ref = data_ref(spec)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(ref, f"limit must be a positive integer, got {limit!r}")
    path = Path(ref.path).expanduser()
    if path.is_dir() and _saved_to_disk(path):
        dataset, chosen, notes = _load_saved(ref)
        return Source(chosen, "hf_dataset", notes, dataset)
    if path.is_dir() or (not path.exists() and looks_like_hub_id(ref.path)):
        kind = "dataset_repo" if path.is_dir() else "hub"
        dataset, chosen, notes = load_split(ref, on_hub=kind == "hub")
        return Source(chosen, kind, notes, dataset)
    if not path.exists():
        raise DataError(ref, "no such file or folder")
    return Source(ref, detect_file_format(path), _ignored(ref, ("split", "config", "revision")))


def iter_records(source: Source, limit: int | None) -> Iterator[tuple[int, Any]]:
    """(line or record number, record) of an opened source, at most `limit` of them."""
    if source.dataset is not None:
        yield from _iter_dataset(source.dataset, limit)
        return
    path, file_format = Path(source.ref.path).expanduser(), source.kind
    if file_format == "jsonl":
        it = _iter_jsonl(path)
    elif file_format == "json":
        it = _iter_json(path)
    elif file_format == "csv":
        it = _iter_csv(path)
    else:
        it = _iter_parquet(path, limit)
    try:
        for count, item in enumerate(it, start=1):
            yield item
            if limit is not None and count >= limit:
                return
    except UnicodeDecodeError as exc:
        line = _first_non_utf8_line(path)
        raise DataError(
            source.ref,
            f"not valid UTF-8 text ({exc.reason}, byte {exc.object[exc.start : exc.start + 1]!r})",
            line=line,
        ) from None
    except (OSError, EOFError) as exc:  # e.g. gzip.BadGzipFile, truncated gzip
        raise DataError(source.ref, f"cannot read file ({exc})") from None
    except csv.Error as exc:
        raise DataError(source.ref, f"invalid CSV ({exc})") from None
