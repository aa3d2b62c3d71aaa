"""File readers: JSONL (.gz), JSON, CSV, Parquet and saved HF datasets, as (position, record)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

FILE_FORMATS = ("jsonl", "json", "parquet", "csv", "hf_dataset")


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


def _iter_hf_dataset(path: Path, limit: int | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(path, f"reading a dataset folder needs `datasets` ({exc})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(
            path, f"folder is not a dataset saved with datasets.save_to_disk ({exc})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(
                path, f"dataset has splits {splits} and none is 'train'; pass the split folder"
            )
    n = len(ds) if limit is None else min(limit, len(ds))
    if n < len(ds):
        ds = ds.select(range(n))
    for i, rec in enumerate(ds, start=1):
        yield i, rec


def iter_records(path: Path, file_format: str, limit: int | None) -> Iterator[tuple[int, Any]]:
    if file_format == "jsonl":
        it = _iter_jsonl(path)
    elif file_format == "json":
        it = _iter_json(path)
    elif file_format == "csv":
        it = _iter_csv(path)
    elif file_format == "parquet":
        it = _iter_parquet(path, limit)
    else:
        it = _iter_hf_dataset(path, limit)
    try:
        for count, item in enumerate(it, start=1):
            yield item
            if limit is not None and count >= limit:
                return
    except UnicodeDecodeError as exc:
        line = _first_non_utf8_line(path)
        raise DataError(
            path,
            f"not valid UTF-8 text ({exc.reason}, byte {exc.object[exc.start : exc.start + 1]!r})",
            line=line,
        ) from None
    except (OSError, EOFError) as exc:  # e.g. gzip.BadGzipFile, truncated gzip
        raise DataError(path, f"cannot read file ({exc})") from None
    except csv.Error as exc:
        raise DataError(path, f"invalid CSV ({exc})") from None


def checked_source(path: Path, limit: int | None) -> tuple[str, str]:
    """(file format, what an error position is called) of an existing path, with `limit` checked."""
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(path, f"limit must be a positive integer, got {limit!r}")
    kind = detect_file_format(path)
    return kind, ("line" if kind == "jsonl" else "record")
