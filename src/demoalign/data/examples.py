"""Demonstrations (prompt -> demonstrated response) from any data option.

`load_examples` opens the source (readers.py: files, saved datasets, dataset repository folders
and hub ids, hub.py), recognises the record format from the first record's keys or an explicit
`columns` mapping (formats.py), and returns the examples with a :class:`DataReport` of what was
read, kept and dropped: empty responses and exact duplicates are dropped and counted, a malformed
record is a DataError naming the source, the line or record and the field, and no usable example
at all is an error. `load_prompts` reads held-out prompts; `inspect_data` is `demoalign data
inspect`.
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
from .readers import Source, iter_records, open_source


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
    path: str | Path | Source,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[list[Example], DataReport]:
    """Read demonstrations from ``path`` (any data option, see readers.open_source).

    ``columns={"prompt": COL, "response": COL}`` overrides format recognition.
    ``limit`` caps the number of records read.  Raises :class:`DataError` on any
    problem, naming the source, line/record and field.
    """
    source = open_source(path, limit)
    path, unit = source.ref, source.unit
    if columns is not None:
        _check_columns(path, columns)
    examples: list[Example] = []
    seen: set[Example] = set()
    counts = {"records": 0, "empty": 0, "duplicates": 0, "multi_turn": 0}
    record_format = parse = None
    for lineno, rec in iter_records(source, limit):
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
    return examples, _report(source, record_format, counts, len(examples), limit)


def _choose_parser(path, rec: dict, columns, lineno: int, unit: str):
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


def _parse_one(path, rec: dict, parse, record_format: str, lineno: int, unit: str):
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


def _check_some_examples(path, counts: dict, examples: list) -> None:
    if counts["records"] == 0:
        raise DataError(path, "no records found (empty file?)")
    if not examples:
        raise DataError(
            path, f"no usable examples: all {counts['records']} records have an empty response"
        )


def _report(source: Source, record_format: str, counts: dict, kept: int, limit) -> DataReport:
    notes = list(source.notes)
    notes += [_NOTES[record_format]] if record_format in _NOTES else []
    if limit is not None and counts["records"] >= limit:
        notes.append(f"reading stopped at limit={limit} records")
    return DataReport(
        path=str(source.ref),
        file_format=source.kind,
        record_format=record_format,
        n_records=counts["records"],
        n_examples=kept,
        n_empty_responses=counts["empty"],
        n_duplicates=counts["duplicates"],
        n_multi_turn=counts["multi_turn"],
        notes=notes,
    )


def load_prompts(path: str | Source, limit: int | None = None) -> list[Example]:
    """Held-out prompts: records with a `prompt` string (nothing else needed), or any format
    `data` accepts (its responses ignored, earlier turns kept)."""
    p = open_source(path, limit)
    records = []
    for _, rec in iter_records(p, limit):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str)):
            records = None
            break
        records.append(Example(rec["prompt"], ""))
    if records is None:
        examples, _ = load_examples(p, limit=limit)
        return [Example(e.prompt, "", e.history) for e in examples]
    if not records:
        raise DataError(p.ref, "no records found (empty file?)")
    return records


def _clip(text: str, width: int = 600) -> str:
    if len(text) <= width:
        return text
    return text[:width] + f" ... [{len(text)} chars]"


def inspect_data(path: str | Path | Source, columns: dict[str, str] | None = None) -> str:
    """Load ``path`` and return the report summary followed by the first example."""
    source = open_source(path)
    examples, report = load_examples(source, columns=columns)
    ex = examples[0]
    lines = [report.summary(), "", "first example:"]
    for role, content in ex.history:
        lines.append(f"  [{role}] {_clip(content)}")
    lines.append(f"  [prompt] {_clip(ex.prompt)}")
    lines.append(f"  [response] {_clip(ex.response)}")
    lines.extend(_preference_summary(source))
    return "\n".join(lines)


def _preference_summary(source: Source) -> list[str]:
    """A line on the data read as preference pairs, when its records have chosen and rejected."""
    first = next(iter_records(source, 1), (0, None))[1]
    if not (isinstance(first, dict) and "chosen" in first and "rejected" in first):
        return []
    try:
        _, counts = read_preference_pairs(source)
    except DataError as exc:  # still fine as demonstrations, which is what inspect reports first
        return ["", f"as preference pairs: not loadable ({exc})"]
    usable = counts["records"] - counts["empty"] - counts["identical"]
    return [
        "",
        f"as preference pairs: {usable} usable of {counts['records']} records; dropped "
        f"{counts['empty']} with an empty side, {counts['identical']} with chosen "
        "identical to rejected",
    ]
