"""The one exception the data layer raises for bad input on disk.

``DataError`` subclasses ``ValueError`` so generic callers can catch it as one; the CLI maps it to
exit code 2. Its message always starts with the offending file or folder, then the problem.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad dataset input: missing/empty folder, unmatched files, unreadable or inconsistent file.

    ``path`` is the file or folder at fault (``None`` when the problem has no single file).
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


def preview(items: list[str], limit: int = 5) -> str:
    """``a, b, c (+4 more)``: a short list of names for error messages."""
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return f"{shown} (+{more} more)" if more > 0 else shown
