"""Preference pairs (prompt, chosen, rejected): the one reader for files of pairs."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, _describe, _RecordError
from .formats import Example, Preference, _get_str, _parse_hh_record
from .readers import Source, iter_records, open_source


def _parse_preference_record(rec: dict) -> Preference:
    """Preference(Example(prompt, chosen, history), rejected) from one preference record."""
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _RecordError(
                f"missing (keys found: {sorted(rec)}); preference pairs need "
                "prompt/chosen/rejected strings or HH chosen/rejected transcripts",
                key,
            )
    if isinstance(rec.get("prompt"), str) and isinstance(rec["chosen"], str):
        prompt = _get_str(rec, "prompt")
        return Preference(Example(prompt, _get_str(rec, "chosen")), _get_str(rec, "rejected"))
    prompt, chosen, history = _parse_hh_record(rec)
    try:
        other_prompt, rejected, other_history = _parse_hh_record({**rec, "chosen": rec["rejected"]})
    except _RecordError as exc:
        raise _RecordError(
            exc.message, (exc.field or "").replace("chosen", "rejected") or "rejected"
        ) from None
    if (prompt, history) != (other_prompt, other_history):
        raise _RecordError(
            "chosen and rejected transcripts differ before their last Assistant turn "
            "(they must answer the same conversation)",
            "rejected",
        )
    return Preference(Example(prompt, chosen, history), rejected)


def load_preference_pairs(path: str | Path | Source, limit: int | None = None) -> list[Preference]:
    """Preference pairs ``[Preference(Example(prompt, chosen, history), rejected)]`` from ``path``.

    Records are UltraFeedback-style ``prompt``/``chosen``/``rejected`` strings, or HH
    ``chosen``/``rejected`` transcripts (or message lists, optionally with a ``prompt`` message
    list), which must share everything before their last Assistant turn. Any data option is read
    as by :func:`load_examples` (a file, a dataset folder, a hub id, `SOURCE[@CONFIG][:SPLIT]`);
    a malformed record is a :class:`DataError` naming the source, the line (or record) and the
    field. Pairs whose chosen or rejected response is empty are dropped; an
    empty file or one with no usable pair is an error.
    """
    return read_preference_pairs(path, limit)[0]


def read_preference_pairs(path: str | Path | Source, limit: int | None = None):
    """(pairs, counts): what load_preference_pairs returns, and how many records were read and
    dropped for an empty side or for a chosen identical to its rejected (no preference)."""
    source = open_source(path, limit)
    path, unit = source.ref, source.unit
    pairs: list[Preference] = []
    counts = {"records": 0, "empty": 0, "identical": 0}
    for lineno, rec in iter_records(source, limit):
        counts["records"] += 1
        if not isinstance(rec, dict):
            raise DataError(
                path, f"record is not a JSON object (got {_describe(rec)})", line=lineno, unit=unit
            )
        try:
            example, rejected = _parse_preference_record(rec)
        except _RecordError as exc:
            raise DataError(path, exc.message, line=lineno, field=exc.field, unit=unit) from None
        if not (example.response.strip() and rejected.strip()):
            counts["empty"] += 1
        elif example.response == rejected:
            counts["identical"] += 1
        else:
            pairs.append(Preference(example, rejected))
    if counts["records"] == 0:
        raise DataError(path, "no records found (empty file?)")
    if not pairs:
        raise DataError(
            path,
            f"no usable preference pairs among {counts['records']} records "
            f"({counts['empty']} with an empty side, {counts['identical']} "
            "with chosen identical to rejected)",
        )
    return pairs, counts
