"""Load demonstration data (prompt -> demonstrated response) from local files.

Every supported file becomes a list of :class:`Example` plus a :class:`DataReport`
describing what was read, kept and dropped.

File kinds (chosen from the path):

* ``.jsonl`` / ``.jsonl.gz`` (also ``.ndjson``): one JSON object per line; blank lines
  are skipped; errors name the physical line number.
* ``.json`` / ``.json.gz``: a list of records, or an object ``{"data": [...]}`` /
  ``{"train": [...]}``.  (A ``.json`` file that is really JSON Lines is read as such.)
* ``.parquet``: read with pyarrow.
* ``.csv``: read with the csv module (``utf-8-sig``, so a BOM is dropped); all cells
  are strings.
* a folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``: split
  ``train`` if present, else the only split, else an error listing the splits).

Record formats are recognised from the keys of the FIRST record; every later record
must follow the same format.  In order of precedence:

=================  ==========================================================
``messages``       ``messages``: list of ``{role, content}``; last = assistant
                   (the response), the one before = user (the prompt), earlier
                   turns are the history.
``spin``           ``real`` (SPIN data, usually with ``generated``): ``real`` is
                   a message list as above; ``generated`` is ignored.
prompt/response    ``prompt``, ``response``
prompt/completion  ``prompt``, ``completion``
prompt/chosen      ``prompt`` and ``chosen`` strings (UltraFeedback-style
                   preference data): response = chosen, ``rejected`` ignored.
``alpaca``         ``instruction``, ``output`` (``input`` optional): prompt =
                   instruction + "\\n\\n" + input when input is non-empty.
question/answer    ``question``, ``answer`` (e.g. GSM8K)
``hh``             ``chosen`` holding an Anthropic-HH transcript
                   ("\\n\\nHuman: ... \\n\\nAssistant: ..."), or a message list
                   (UltraFeedback/trl style; a ``prompt`` message list, if
                   present and ``chosen`` holds only the answer, is prepended).
``columns``        explicit mapping ``columns={"prompt": COL, "response": COL}``
                   (overrides recognition for any file).
=================  ==========================================================

Rules:

* prompt and response must be strings; anything else (``None``, numbers, a missing
  field) is a :class:`DataError` naming the file, the line/record and the field.
* An empty or whitespace-only response is counted in ``n_empty_responses`` and the
  record is dropped (not an error).
* An empty prompt is allowed (plain LM continuation of the response).
* Exact duplicate examples (same history, prompt and response) are counted in
  ``n_duplicates`` and dropped, keeping the first.
* Text is kept exactly as written, except that HH transcript turns are stripped of
  surrounding whitespace (the markers are followed by a space).  In HH transcripts,
  consecutive turns of the same speaker (a few exist in the real harmless-base data,
  e.g. "Assistant: ... Assistant: ...") are joined with "\\n\\n" into one turn.
* ``limit`` caps the number of records read.
* If no examples survive (all responses empty) a DataError is raised.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "Example",
    "DataError",
    "DataReport",
    "RECORD_FORMATS",
    "FILE_FORMATS",
    "load_examples",
    "load_preference_pairs",
    "inspect_data",
    "parse_columns",
]

FILE_FORMATS = ("jsonl", "json", "parquet", "csv", "hf_dataset")
RECORD_FORMATS = (
    "prompt/response",
    "prompt/completion",
    "messages",
    "spin",
    "hh",
    "alpaca",
    "question/answer",
    "prompt/chosen",
    "columns",
)

_ROLES = ("system", "user", "assistant")

# Human-readable description of the recognised formats (used in error messages).
_FORMAT_HELP = (
    "messages (messages), spin (real[, generated]), prompt/response (prompt, response), "
    "prompt/completion (prompt, completion), prompt/chosen (prompt, chosen strings), "
    "alpaca (instruction, output[, input]), question/answer (question, answer), "
    "hh (chosen: HH transcript or message list)"
)


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Example:
    """One demonstration: ``response`` is the demonstrated answer to ``prompt``.

    ``history`` holds earlier turns as ``(role, content)`` pairs, oldest first, roles
    ``"system"``, ``"user"`` or ``"assistant"``.
    """

    prompt: str
    response: str
    history: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict]:
        """History plus the final user turn as chat messages (without the response)."""
        msgs = [{"role": role, "content": content} for role, content in self.history]
        msgs.append({"role": "user", "content": self.prompt})
        return msgs


class DataError(ValueError):
    """A data file could not be read or a record is malformed.

    The message always names the file and, where applicable, the line (JSONL) or
    1-based record number (JSON arrays, CSV rows, parquet / dataset rows) and the
    field.  The parts are also available as attributes.
    """

    def __init__(
        self,
        path: str | Path,
        message: str,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.detail = message
        parts = [self.path]
        if line is not None:
            parts.append(f"{unit} {line}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts) + ": " + message)


@dataclass
class DataReport:
    """What :func:`load_examples` read, kept and dropped."""

    path: str
    file_format: str
    record_format: str
    n_records: int
    n_examples: int
    n_empty_responses: int
    n_duplicates: int
    n_multi_turn: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"file:             {self.path}",
            f"file format:      {self.file_format}",
            f"record format:    {self.record_format}",
            f"records read:     {self.n_records}",
            f"examples kept:    {self.n_examples}",
            f"empty responses:  {self.n_empty_responses} (dropped)",
            f"duplicates:       {self.n_duplicates} (dropped)",
            f"multi-turn:       {self.n_multi_turn} (examples with earlier turns)",
        ]
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


# ------------------------------------------------------------------ file readers


def _file_format(path: Path) -> str:
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


def _iter_records(path: Path, file_format: str, limit: int | None) -> Iterator[tuple[int, Any]]:
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
        raise DataError(path, f"not valid UTF-8 text ({exc.reason}, byte "
                              f"{exc.object[exc.start:exc.start + 1]!r})", line=line) from None
    except (OSError, EOFError) as exc:  # e.g. gzip.BadGzipFile, truncated gzip
        raise DataError(path, f"cannot read file ({exc})") from None
    except csv.Error as exc:
        raise DataError(path, f"invalid CSV ({exc})") from None


# ------------------------------------------------------------- record parsing


class _RecordError(Exception):
    """Raised by parsers; turned into a DataError with file and line."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _get_str(rec: dict, key: str) -> str:
    if key not in rec:
        raise _RecordError(f"missing (keys found: {sorted(rec)})", key)
    value = rec[key]
    if not isinstance(value, str):
        raise _RecordError(f"expected a string, got {_describe(value)}", key)
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "null/None"
    return type(value).__name__


def _from_messages(msgs: Any, fld: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not isinstance(msgs, list):
        raise _RecordError(f"expected a list of messages, got {_describe(msgs)}", fld)
    if len(msgs) < 2:
        raise _RecordError(
            f"needs at least a user and an assistant message, got {len(msgs)} message(s)", fld
        )
    turns: list[tuple[str, str]] = []
    for j, m in enumerate(msgs):
        where = f"{fld}[{j}]"
        if not isinstance(m, dict):
            raise _RecordError(
                f"expected an object with role and content, got {_describe(m)}", where
            )
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise _RecordError(f"role must be one of {list(_ROLES)}, got {role!r}", where + ".role")
        if not isinstance(content, str):
            raise _RecordError(f"expected a string, got {_describe(content)}", where + ".content")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise _RecordError(
            f"the last message must be an assistant message (the response), got role "
            f"{turns[-1][0]!r}",
            fld,
        )
    if turns[-2][0] != "user":
        raise _RecordError(
            f"the message before the final assistant message must be a user message, got role "
            f"{turns[-2][0]!r}",
            fld,
        )
    return turns[-2][1], turns[-1][1], tuple(turns[:-2])


_HH_MARKER = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def _from_hh(text: str, fld: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not text.startswith("\n\n"):
        stripped = text.lstrip()
        if stripped.startswith(("Human:", "Assistant:")):
            text = "\n\n" + stripped
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise _RecordError(
            "HH transcript must start with '\\n\\nHuman:' (found text before the first marker)",
            fld,
        )
    turns: list[list[str]] = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if "Human" in marker else "assistant"
        content = content.strip()
        if turns and turns[-1][0] == role:  # same speaker twice in a row: one turn
            turns[-1][1] = turns[-1][1] + "\n\n" + content
        else:
            turns.append([role, content])
    if not turns or turns[-1][0] != "assistant":
        raise _RecordError(
            "HH transcript must end with an Assistant turn (the response); "
            + ("no 'Human:'/'Assistant:' markers found" if not turns else "the last turn is Human"),
            fld,
        )
    if len(turns) < 2:
        raise _RecordError("HH transcript has no Human turn before the final Assistant turn", fld)
    return turns[-2][1], turns[-1][1], tuple((r, c) for r, c in turns[:-2])


def _parse_hh_record(rec: dict) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if "chosen" not in rec:
        raise _RecordError(f"missing (keys found: {sorted(rec)})", "chosen")
    chosen = rec["chosen"]
    if isinstance(chosen, str):
        return _from_hh(chosen, "chosen")
    if isinstance(chosen, list):
        first_role = chosen[0].get("role") if chosen and isinstance(chosen[0], dict) else None
        if first_role in ("user", "system"):  # full conversation
            return _from_messages(chosen, "chosen")
        prompt = rec.get("prompt")
        if isinstance(prompt, list):
            return _from_messages(prompt + chosen, "prompt+chosen")
        if isinstance(prompt, str):
            return _from_messages([{"role": "user", "content": prompt}] + chosen, "prompt+chosen")
        return _from_messages(chosen, "chosen")
    raise _RecordError(
        f"expected an HH transcript string or a message list, got {_describe(chosen)}", "chosen"
    )


def _parse_alpaca(rec: dict) -> tuple[str, str, tuple]:
    instruction = _get_str(rec, "instruction")
    output = _get_str(rec, "output")
    inp = rec.get("input")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise _RecordError(f"expected a string, got {_describe(inp)}", "input")
    prompt = instruction + "\n\n" + inp if inp.strip() else instruction
    return prompt, output, ()


def _pair_parser(prompt_key: str, response_key: str):
    def parse(rec: dict) -> tuple[str, str, tuple]:
        return _get_str(rec, prompt_key), _get_str(rec, response_key), ()

    return parse


def _messages_parser(key: str):
    def parse(rec: dict) -> tuple[str, str, tuple]:
        if key not in rec:
            raise _RecordError(f"missing (keys found: {sorted(rec)})", key)
        return _from_messages(rec[key], key)

    return parse


_PARSERS = {
    "messages": _messages_parser("messages"),
    "spin": _messages_parser("real"),
    "prompt/response": _pair_parser("prompt", "response"),
    "prompt/completion": _pair_parser("prompt", "completion"),
    "prompt/chosen": _pair_parser("prompt", "chosen"),
    "alpaca": _parse_alpaca,
    "question/answer": _pair_parser("question", "answer"),
    "hh": _parse_hh_record,
}

_NOTES = {
    "spin": "SPIN data: only the 'real' conversations are used; the 'generated' column is ignored",
    "hh": "preference data: only 'chosen' is used as the demonstration; 'rejected' is ignored",
    "prompt/chosen": "preference data: response = 'chosen'; 'rejected' is ignored",
}


def _detect_format(rec: dict) -> str | None:
    keys = set(rec)
    if "messages" in keys:
        return "messages"
    if "real" in keys:
        return "spin"
    if {"prompt", "response"} <= keys:
        return "prompt/response"
    if {"prompt", "completion"} <= keys:
        return "prompt/completion"
    if {"prompt", "chosen"} <= keys and isinstance(rec["prompt"], str) and isinstance(
        rec["chosen"], str
    ):
        return "prompt/chosen"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer"} <= keys:
        return "question/answer"
    if "chosen" in keys:
        return "hh"
    return None


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """Parse a CLI mapping ``"prompt:COL,response:COL"`` into a dict (dicts pass through)."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict[str, str] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, col = item.partition(":")
        if not sep or not key.strip() or not col.strip():
            raise ValueError(
                f"bad column mapping item {item!r}; expected columns=prompt:COL,response:COL"
            )
        out[key.strip()] = col.strip()
    return out


def _check_columns(path: Path, columns: dict[str, str]) -> None:
    if not isinstance(columns, dict):
        raise DataError(path, f"columns must be a dict, got {type(columns).__name__}")
    unknown = sorted(set(columns) - {"prompt", "response"})
    missing = sorted({"prompt", "response"} - set(columns))
    if unknown or missing:
        raise DataError(
            path,
            "columns must map exactly 'prompt' and 'response' to column names "
            f"(missing: {missing}, unknown: {unknown}); e.g. columns=prompt:COL,response:COL",
        )


# ----------------------------------------------------------------- public API


def _checked_source(path: Path, limit: int | None) -> tuple[str, str]:
    """(file format, what an error position is called) of an existing path, with `limit` checked."""
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(path, f"limit must be a positive integer, got {limit!r}")
    file_format = _file_format(path)
    return file_format, ("line" if file_format == "jsonl" else "record")


def load_examples(
    path: str | Path,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[list[Example], DataReport]:
    """Read demonstrations from ``path``; see the module docstring for formats and rules.

    ``columns={"prompt": COL, "response": COL}`` overrides format recognition.
    ``limit`` caps the number of records read.  Raises :class:`DataError` on any
    problem, naming the file, line/record and field.
    """
    path = Path(path)
    file_format, unit = _checked_source(path, limit)
    if columns is not None:
        _check_columns(path, columns)

    examples: list[Example] = []
    seen: set[Example] = set()
    n_records = n_empty = n_dup = n_multi = 0
    record_format: str | None = None
    parse = None

    for lineno, rec in _iter_records(path, file_format, limit):
        n_records += 1
        if not isinstance(rec, dict):
            raise DataError(
                path, f"record is not a JSON object (got {_describe(rec)})", line=lineno, unit=unit
            )
        if parse is None:
            if columns is not None:
                for key in ("prompt", "response"):
                    if columns[key] not in rec:
                        raise DataError(
                            path,
                            f"mapped {key} column {columns[key]!r} not found; available "
                            f"columns: {sorted(rec)}",
                            line=lineno,
                            field=columns[key],
                            unit=unit,
                        )
                record_format = "columns"
                parse = _pair_parser(columns["prompt"], columns["response"])
            else:
                record_format = _detect_format(rec)
                if record_format is None:
                    raise DataError(
                        path,
                        f"unrecognised record format; keys found: {sorted(rec)}. Accepted "
                        f"formats: {_FORMAT_HELP}. Pass an explicit mapping "
                        "columns={'prompt': COL, 'response': COL} "
                        "(CLI: columns=prompt:COL,response:COL)",
                        line=lineno,
                        unit=unit,
                    )
                parse = _PARSERS[record_format]
        try:
            prompt, response, history = parse(rec)
        except _RecordError as exc:
            raise DataError(
                path,
                f"{exc.message} (record format {record_format})",
                line=lineno,
                field=exc.field,
                unit=unit,
            ) from None
        if not response.strip():
            n_empty += 1
            continue
        ex = Example(prompt=prompt, response=response, history=history)
        if ex in seen:
            n_dup += 1
            continue
        seen.add(ex)
        examples.append(ex)
        if history:
            n_multi += 1

    if n_records == 0:
        raise DataError(path, "no records found (empty file?)")
    if not examples:
        raise DataError(
            path,
            f"no usable examples: all {n_records} records have an empty response",
        )
    assert record_format is not None
    notes = []
    if record_format in _NOTES:
        notes.append(_NOTES[record_format])
    if limit is not None and n_records >= limit:
        notes.append(f"reading stopped at limit={limit} records")
    report = DataReport(
        path=str(path),
        file_format=file_format,
        record_format=record_format,
        n_records=n_records,
        n_examples=len(examples),
        n_empty_responses=n_empty,
        n_duplicates=n_dup,
        n_multi_turn=n_multi,
        notes=notes,
    )
    return examples, report


def load_prompts(path: str, limit: int | None = None) -> list[Example]:
    """Held-out prompts: records with a `prompt` string (nothing else needed), or any format
    `data` accepts (its responses ignored, earlier turns kept)."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file or folder")
    records = []
    for lineno, rec in _iter_records(p, _file_format(p), limit):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str)):
            records = None
            break
        records.append(Example(rec["prompt"], ""))
    if records is None:
        examples, _ = load_examples(p, limit=limit)
        return [Example(e.prompt, "", e.history) for e in examples]
    if not records:
        raise DataError(p, "no records found (empty file?)")
    return records


def _parse_preference_record(rec: dict) -> tuple[Example, str]:
    """(Example(prompt, chosen, history), rejected) from one preference record."""
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _RecordError(f"missing (keys found: {sorted(rec)}); preference pairs need "
                               "prompt/chosen/rejected strings or HH chosen/rejected transcripts", key)
    if isinstance(rec.get("prompt"), str) and isinstance(rec["chosen"], str):
        prompt = _get_str(rec, "prompt")
        return Example(prompt, _get_str(rec, "chosen")), _get_str(rec, "rejected")
    prompt, chosen, history = _parse_hh_record(rec)
    try:
        other_prompt, rejected, other_history = _parse_hh_record({**rec, "chosen": rec["rejected"]})
    except _RecordError as exc:
        raise _RecordError(exc.message, (exc.field or "").replace("chosen", "rejected") or "rejected") from None
    if (prompt, history) != (other_prompt, other_history):
        raise _RecordError("chosen and rejected transcripts differ before their last Assistant turn "
                           "(they must answer the same conversation)", "rejected")
    return Example(prompt, chosen, history), rejected


def load_preference_pairs(path: str | Path, limit: int | None = None) -> list[tuple[Example, str]]:
    """Preference pairs ``[(Example(prompt, chosen, history), rejected)]`` from ``path``.

    Records are UltraFeedback-style ``prompt``/``chosen``/``rejected`` strings, or HH
    ``chosen``/``rejected`` transcripts (or message lists, optionally with a ``prompt`` message
    list), which must share everything before their last Assistant turn. Files are read as by
    :func:`load_examples`; a malformed record is a :class:`DataError` naming the file, the line
    (or record) and the field. Pairs whose chosen or rejected response is empty are dropped; an
    empty file or one with no usable pair is an error.
    """
    return read_preference_pairs(path, limit)[0]


def read_preference_pairs(path: str | Path, limit: int | None = None):
    """(pairs, counts): what load_preference_pairs returns, and how many records were read and
    dropped for an empty side or for a chosen identical to its rejected (no preference)."""
    path = Path(path)
    file_format, unit = _checked_source(path, limit)
    pairs: list[tuple[Example, str]] = []
    counts = {"records": 0, "empty": 0, "identical": 0}
    for lineno, rec in _iter_records(path, file_format, limit):
        counts["records"] += 1
        if not isinstance(rec, dict):
            raise DataError(path, f"record is not a JSON object (got {_describe(rec)})",
                            line=lineno, unit=unit)
        try:
            example, rejected = _parse_preference_record(rec)
        except _RecordError as exc:
            raise DataError(path, exc.message, line=lineno, field=exc.field, unit=unit) from None
        if not (example.response.strip() and rejected.strip()):
            counts["empty"] += 1
        elif example.response == rejected:
            counts["identical"] += 1
        else:
            pairs.append((example, rejected))
    if counts["records"] == 0:
        raise DataError(path, "no records found (empty file?)")
    if not pairs:
        raise DataError(path, f"no usable preference pairs among {counts['records']} records "
                              f"({counts['empty']} with an empty side, {counts['identical']} "
                              "with chosen identical to rejected)")
    return pairs, counts


def _clip(text: str, width: int = 600) -> str:
    if len(text) <= width:
        return text
    return text[:width] + f" ... [{len(text)} chars]"


def inspect_data(path: str | Path, columns: dict[str, str] | None = None) -> str:
    """Load ``path`` and return the report summary followed by the first example."""
    examples, report = load_examples(path, columns=columns)
    ex = examples[0]
    lines = [report.summary(), "", "first example:"]
    for role, content in ex.history:
        lines.append(f"  [{role}] {_clip(content)}")
    lines.append(f"  [prompt] {_clip(ex.prompt)}")
    lines.append(f"  [response] {_clip(ex.response)}")
    lines.extend(_preference_summary(Path(path)))
    return "\n".join(lines)


def _preference_summary(path: Path) -> list[str]:
    """A line on the file read as preference pairs, when its records have chosen and rejected."""
    first = next(_iter_records(path, _file_format(path), 1), (0, None))[1]
    if not (isinstance(first, dict) and "chosen" in first and "rejected" in first):
        return []
    try:
        _, counts = read_preference_pairs(path)
    except DataError as exc:  # still fine as demonstrations, which is what inspect reports first
        return ["", f"as preference pairs: not loadable ({exc})"]
    usable = counts["records"] - counts["empty"] - counts["identical"]
    return ["", f"as preference pairs: {usable} usable of {counts['records']} records; dropped "
                f"{counts['empty']} with an empty side, {counts['identical']} with chosen "
                "identical to rejected"]
