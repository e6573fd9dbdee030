"""Import direction (docs/architecture.md): the oracle needs only numpy; the edge runtime never
pulls torch. Checked in a subprocess where the forbidden modules cannot be imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def _import_with_blocked(module: str, blocked: list[str]) -> subprocess.CompletedProcess:
    code = BLOCK.format(mods=blocked) + f"import {module}\nprint('ok')\n"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("module", ["reference", "reference.metrics"])
def test_reference_imports_with_numpy_only(module):
    blocked = ["torch", "scipy", "onnx", "onnxruntime", "hidiff", "export", "edge_runtime", "PIL"]
    proc = _import_with_blocked(module, blocked)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", ["hidiff", "hidiff.cli", "hidiff.pipeline", "hidiff.evaluation"])
def test_hidiff_never_imports_export_or_edge_runtime(module):
    # hidiff.cli finds `export`'s subcommands through an entry point, never by import
    proc = _import_with_blocked(module, ["export", "edge_runtime"])
    assert proc.returncode == 0, proc.stderr
