"""The data layer's errors: a DataError always names the file, the line or record, and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


class _RecordError(Exception):
    """Raised by parsers; turned into a DataError with file and line."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _describe(value: Any) -> str:
    if value is None:
        return "null/None"
    return type(value).__name__
