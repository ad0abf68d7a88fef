"""One error type for bad input: it names the file, the line and the field."""
from __future__ import annotations


class PrivcodeError(Exception):
    """A user-facing error. The CLI prints it as one line and exits with status 2."""

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")
