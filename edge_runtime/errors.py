"""Errors of the edge runtime: every one is a ``ValueError`` that names the offending file."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EdgeError", "InputError", "ModelError"]


class EdgeError(ValueError):
    """Base class: a problem the user can fix (bad model folder, bad input, bad argument)."""


class ModelError(EdgeError):
    """The exported model folder is missing, unreadable, foreign or inconsistent."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class InputError(EdgeError):
    """An input image is unreadable or not what the model takes (e.g. 16-bit, grayscale)."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(reason if path is None else f"{self.path}: {reason}")
