"""Import direction (docs/architecture.md): the oracle needs only numpy; the edge runtime never
pulls torch. Checked in a subprocess where the forbidden modules cannot be imported."""

from __future__ import annotations

import re
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


def _module_imports() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports anywhere in its file (function-local imports
    included), resolved to files; package ``__init__`` files are left out (they re-export)."""
    import ast

    packages = ("reference", "hidiff", "export", "edge_runtime")
    files = {}
    for pkg in packages:
        for path in (REPO_ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(REPO_ROOT).with_suffix("")
            name = ".".join(rel.parts)
            if path.name != "__init__.py":
                files[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycles_between_modules():
    """No module of ours imports, directly or through others, a module that imports it back
    (function-local imports count: they only hide a cycle)."""
    graph = _module_imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_edge_extra_installs_no_torch():
    """``pip install hidiff[edge]`` (the point-of-care install) pulls no torch, and the base
    install (the oracle) needs numpy only: read from pyproject.toml."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library >= 3.11")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(project["dependencies"]) == {"numpy"}
    edge = names(project["optional-dependencies"]["edge"])
    assert "onnxruntime" in edge and not edge & {"torch", "torchvision", "onnxscript"}, edge
    assert "torch" in names(project["optional-dependencies"]["train"])


def test_the_command_line_loads_no_onnx_until_a_command_needs_it():
    """``hidiff --help`` lists the ``export`` plugin's commands with onnx and onnxruntime
    unimportable: their definitions load neither (``export`` imports its names on first use)."""
    code = (BLOCK.format(mods=["onnx", "onnxruntime"]) + "from hidiff.cli import main\n"
            "raise SystemExit(main(['--help']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "verify-export" in proc.stdout and "warning" not in proc.stderr


def test_a_plugin_that_cannot_load_leaves_hidiffs_own_commands_working():
    """With the ``export`` package unimportable its plugin cannot load: ``hidiff`` says so on
    stderr and its own commands still parse (``train --help`` exits 0)."""
    code = (BLOCK.format(mods=["export", "export.cli"]) + "from hidiff.cli import main\n"
            "raise SystemExit(main(['train', '--help']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max-minutes" in proc.stdout
    assert "hidiff: warning: the commands of export.cli:add_export_commands are unavailable" \
        in proc.stderr
