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

from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, _describe, _RecordError
from .formats import (
    _FORMAT_HELP,
    _NOTES,
    _PARSERS,
    Example,
    _check_columns,
    _detect_format,
    _pair_parser,
)
from .preferences import read_preference_pairs
from .readers import checked_source, detect_file_format, iter_records


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
    kind, unit = checked_source(path, limit)
    if columns is not None:
        _check_columns(path, columns)
    examples: list[Example] = []
    seen: set[Example] = set()
    counts = {"records": 0, "empty": 0, "duplicates": 0, "multi_turn": 0}
    record_format = parse = None
    for lineno, rec in iter_records(path, kind, limit):
        counts["records"] += 1
        if not isinstance(rec, dict):
            raise DataError(
                path, f"record is not a JSON object (got {_describe(rec)})", line=lineno, unit=unit
            )
        if parse is None:
            record_format, parse = _choose_parser(path, rec, columns, lineno, unit)
        example = _parse_one(path, rec, parse, record_format, lineno, unit)
        if not example.response.strip():
            counts["empty"] += 1
        elif example in seen:
            counts["duplicates"] += 1
        else:
            seen.add(example)
            examples.append(example)
            counts["multi_turn"] += bool(example.history)
    _check_some_examples(path, counts, examples)
    return examples, _report(path, kind, record_format, counts, len(examples), limit)


def _choose_parser(path: Path, rec: dict, columns, lineno: int, unit: str):
    """(record format, parser) from the first record's keys, or from explicit columns."""
    if columns is not None:
        for key in ("prompt", "response"):
            if columns[key] not in rec:
                raise DataError(
                    path,
                    f"mapped {key} column {columns[key]!r} not found; "
                    f"available columns: {sorted(rec)}",
                    line=lineno,
                    field=columns[key],
                    unit=unit,
                )
        return "columns", _pair_parser(columns["prompt"], columns["response"])
    record_format = _detect_format(rec)
    if record_format is None:
        raise DataError(
            path,
            f"unrecognised record format; keys found: {sorted(rec)}. Accepted formats: "
            f"{_FORMAT_HELP}. Pass an explicit mapping columns={{'prompt': COL, 'response': COL}} "
            "(CLI: columns=prompt:COL,response:COL)",
            line=lineno,
            unit=unit,
        )
    return record_format, _PARSERS[record_format]


def _parse_one(path: Path, rec: dict, parse, record_format: str, lineno: int, unit: str):
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
    return Example(prompt=prompt, response=response, history=history)


def _check_some_examples(path: Path, counts: dict, examples: list) -> None:
    if counts["records"] == 0:
        raise DataError(path, "no records found (empty file?)")
    if not examples:
        raise DataError(
            path, f"no usable examples: all {counts['records']} records have an empty response"
        )


def _report(
    path: Path, kind: str, record_format: str, counts: dict, kept: int, limit
) -> DataReport:
    notes = [_NOTES[record_format]] if record_format in _NOTES else []
    if limit is not None and counts["records"] >= limit:
        notes.append(f"reading stopped at limit={limit} records")
    return DataReport(
        path=str(path),
        file_format=kind,
        record_format=record_format,
        n_records=counts["records"],
        n_examples=kept,
        n_empty_responses=counts["empty"],
        n_duplicates=counts["duplicates"],
        n_multi_turn=counts["multi_turn"],
        notes=notes,
    )


def load_prompts(path: str, limit: int | None = None) -> list[Example]:
    """Held-out prompts: records with a `prompt` string (nothing else needed), or any format
    `data` accepts (its responses ignored, earlier turns kept)."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file or folder")
    records = []
    for lineno, rec in iter_records(p, detect_file_format(p), limit):
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
    first = next(iter_records(path, detect_file_format(path), 1), (0, None))[1]
    if not (isinstance(first, dict) and "chosen" in first and "rejected" in first):
        return []
    try:
        _, counts = read_preference_pairs(path)
    except DataError as exc:  # still fine as demonstrations, which is what inspect reports first
        return ["", f"as preference pairs: not loadable ({exc})"]
    usable = counts["records"] - counts["empty"] - counts["identical"]
    return [
        "",
        f"as preference pairs: {usable} usable of {counts['records']} records; dropped "
        f"{counts['empty']} with an empty side, {counts['identical']} with chosen "
        "identical to rejected",
    ]
