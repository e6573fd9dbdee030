"""Helpers for the training tests: one intra-op thread everywhere (so an in-process run and a
``python -m hidiff.training`` subprocess compute bit-identically, and 2 busy cores are not
oversubscribed), and a runner for the module entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMON = ("--preset", "tiny", "--no-progress")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _cli_args(kvasir_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "kvasir-seg", "--data", str(kvasir_root), "--out", str(out),
            *COMMON, *extra]


def _run_module(args: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hidiff.training", *args], cwd=REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _popen_module(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hidiff.training", *args], cwd=REPO_ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _torchrun(nproc: int, args: list[str], *, timeout: float = 240
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "hidiff.training", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli() -> SimpleNamespace:
    """``cli.args(root, out, ...)``, ``cli.run(args)``, ``cli.popen(args)``, ``cli.torchrun``."""
    return SimpleNamespace(args=_cli_args, run=_run_module, popen=_popen_module,
                           torchrun=_torchrun, env=_env)
