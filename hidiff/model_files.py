"""Files of a model folder written so that a killed process never leaves a torn one, and the
error that names a missing or corrupt one.

Every write goes through :func:`reference.files.atomic_write` (a temporary file in the same
folder, ``.<name>.*.tmp``, fsynced, then ``os.replace``-d over the target): a reader sees the old
file or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reference.files import atomic_write, atomic_write_bytes, remove_stale_temp_files

__all__ = ["ModelDirError", "atomic_write", "atomic_write_text", "remove_stale_temp_files",
           "write_json"]


class ModelDirError(ValueError):
    """A model folder (or one of its files) is missing, corrupt or of an unknown format.

    The message is the offending path followed by the problem ("DIR/checkpoint.pt is missing:
    train first or pass the right folder"); ``path`` holds the path.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path} {problem}")


# -- atomic writes --------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
