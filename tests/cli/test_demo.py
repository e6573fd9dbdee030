"""The README's main job, `hidiff demo`, end to end on real Kvasir-SEG (a tiny budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def run_hidiff(*args, cwd=REPO_ROOT, timeout=400) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "hidiff.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_trains_evaluates_and_prints_the_three_predictor_table(kvasir_root, tmp_path):
    out = tmp_path / "demo"
    proc = run_hidiff("demo", "--data", str(kvasir_root), "--out", str(out), "--preset", "tiny",
                      "--minutes", "0.3", "--limit", "3", "--fp-twin", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("segmentor", "binary", "full-precision"):
        assert label in proc.stdout.lower(), proc.stdout
    summary = json.loads((out / "eval" / "test" / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert all(summary["predictors"][k]["available"]
               for k in ("segmentor", "hidiff_binary", "hidiff_fp"))
    assert (out / "checkpoint.pt").is_file() and (out / "training_curve.png").is_file()


def test_demo_without_data_explains_where_to_get_it(tmp_path):
    proc = run_hidiff("demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Kvasir-SEG" in proc.stderr
    assert not (tmp_path / "o").exists()
