"""Errors for bad input files: each names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem in an input file, located by file, 1-based line number and field."""

    def __init__(
        self, path: str | Path, message: str, *, line: int | None = None, field: str | int | None = None
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f" field {field}" if isinstance(field, int) else f" field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.field = field
