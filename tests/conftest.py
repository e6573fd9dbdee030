"""Shared test fixtures: locating the real datasets.

Tests that need ``../shared/data`` use the ``kvasir_root`` / ``chase_root`` fixtures. Without the
data they skip with the reason; with ``HIDIFF_REQUIRE_DATA=1`` (as CI sets) they fail instead, so a
missing dataset can never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("HIDIFF_DATA", REPO_ROOT.parent / "shared" / "data"))


def _dataset(name: str, probe: str) -> Path:
    root = DATA_ROOT / name
    if not (root / probe).is_dir():
        reason = f"dataset {name} not found at {root} (set HIDIFF_DATA or place ../shared/data)"
        if os.environ.get("HIDIFF_REQUIRE_DATA") == "1":
            pytest.fail(f"HIDIFF_REQUIRE_DATA=1 but {reason}")
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def kvasir_root() -> Path:
    return _dataset("Kvasir-SEG", "images")


@pytest.fixture(scope="session")
def chase_root() -> Path:
    return _dataset("CHASE_DB1", "images")
