"""Errors for bad input files (each names the file, the line and the field) and for missing inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
        self.message = message
        self.line = line
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled whole (a DataLoader worker sends it to the trainer's process), not rebuilt from its text
        return _data_error, (type(self), self.path, self.message, self.line, self.field)


def _data_error(cls: type[DataError], path: str, message: str, line: int | None, field: str | int | None) -> DataError:
    return cls(path, message, line=line, field=field)


class InputNotFoundError(FileNotFoundError, ValueError):
    """An input a command was pointed at is missing or is not what it should be (a run directory, a teachers
    manifest). A ``FileNotFoundError``, and a ``ValueError`` too: the commands report it as a user error (one line,
    exit status 2; see :class:`mtl.cli.ConfigErrorExit`)."""
