"""Fixtures of the Larq Compute Engine tests.

These tests run in the LCE environment (numpy < 2, ``larq-compute-engine==0.16.0``, see
``requirements-lce.txt``). In any other environment (the main one: numpy 2, or no LCE) the tests
that need LCE skip with the reason; with ``HIDIFF_REQUIRE_LCE=1`` they fail instead.

The model fixtures need torch, which the LCE environment does not have: a tiny model folder with
random weights, its ONNX export and ``refiner_step.tflite`` are built by
``tests/lce/make_fixtures.py`` run with the MAIN environment's python, named by
``HIDIFF_MAIN_PYTHON`` (or taken ready-made from ``HIDIFF_LCE_FIXTURES``, a folder that script
wrote).

``export.lce``'s numpy-only modules (the TFLite writer and the binary-op emitter) are loaded
here as the package ``_hidiff_export_lce`` without executing ``export/__init__.py`` (which
imports torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
FIXTURE_SCRIPT = HERE / "make_fixtures.py"


def lce_status() -> tuple[bool, str]:
    """(usable, reason) for LCE in this process, without importing it."""
    if ("larq_compute_engine" not in sys.modules
            and importlib.util.find_spec("larq_compute_engine") is None):
        return False, ("larq-compute-engine is not installed here (the LCE tests run in the LCE "
                       "environment: pip install -r requirements-lce.txt)")
    if int(np.__version__.split(".")[0]) >= 2:
        return False, (f"larq-compute-engine 0.16 needs numpy < 2; this environment has numpy "
                       f"{np.__version__} (the LCE tests run in the LCE environment)")
    return True, ""


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("HIDIFF_REQUIRE_LCE") == "1":
        pytest.fail(f"HIDIFF_REQUIRE_LCE=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lce() -> None:
    """Skips (or fails under HIDIFF_REQUIRE_LCE=1) unless LCE can run in this process."""
    ok, reason = lce_status()
    if not ok:
        _skip_or_fail(reason)


@pytest.fixture(scope="session")
def lce_export():
    """``export/lce`` as the package ``_hidiff_export_lce`` (its numpy-only modules; needs no
    LCE, runs in either environment)."""
    name = "_hidiff_export_lce"
    if name not in sys.modules:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))  # for `reference`
        package = types.ModuleType(name)
        package.__path__ = [str(REPO_ROOT / "export" / "lce")]
        sys.modules[name] = package
    return types.SimpleNamespace(
        binary_ops=importlib.import_module(f"{name}.binary_ops"),
        writer=importlib.import_module(f"{name}.tflite_writer"),
    )


@pytest.fixture(scope="session")
def lce_backend(lce):
    """:mod:`edge_runtime.lce_backend`."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("edge_runtime.lce_backend")


@pytest.fixture(scope="session")
def lce_fixtures(lce, tmp_path_factory) -> Path:
    """Folder with ``model/`` (tiny, random weights), ``onnx/`` (export_model_dir) and
    ``onnx/refiner_step.tflite`` + ``.lce.json`` (export_lce, batch 1)."""
    ready = os.environ.get("HIDIFF_LCE_FIXTURES")
    if ready:
        folder = Path(ready)
        if not (folder / "onnx" / "refiner_step.tflite").is_file():
            pytest.fail(f"HIDIFF_LCE_FIXTURES={ready} has no onnx/refiner_step.tflite "
                        f"(write it with: python {FIXTURE_SCRIPT.relative_to(REPO_ROOT)} DIR)")
        return folder
    python = os.environ.get("HIDIFF_MAIN_PYTHON")
    if not python:
        _skip_or_fail("set HIDIFF_MAIN_PYTHON to the main environment's python (torch) to build "
                      "the tiny model and its ONNX/TFLite exports, or HIDIFF_LCE_FIXTURES to a "
                      "folder written by tests/lce/make_fixtures.py")
    folder = tmp_path_factory.mktemp("lce_fixtures")
    proc = subprocess.run([python, str(FIXTURE_SCRIPT), str(folder)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{FIXTURE_SCRIPT.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return folder
