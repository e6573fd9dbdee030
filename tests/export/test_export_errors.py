"""Bad requests fail clearly and write nothing; the command line; atomic replacement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import export.api
import export.verify
from export import ExportError, VerificationFailed, export_model_dir
from export.cli import main

REPO = Path(__file__).resolve().parents[2]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_model_folder_without_checkpoint(model_dir_factory, tmp_path):
    model = model_dir_factory(tmp_path / "model", checkpoint=False)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="checkpoint.pt"):
        export_model_dir(model, out)
    assert not out.exists()
    with pytest.raises(ExportError, match="does not exist"):
        export_model_dir(tmp_path / "nowhere", out)
    assert _listing(tmp_path) == ["model"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"opset": 9}, r"unsupported opset 9; supported: 17, 18, 19, 20"),
        ({"ir_version": 14}, r"unsupported ir_version 14 for opset 17; supported: 8, 9, 10"),
        ({"opset": 19, "ir_version": 8}, r"supported: 9, 10"),
    ],
)
def test_unsupported_opset_or_ir_version(tiny_model_dir, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_model_dir(tiny_model_dir, tmp_path / "out", **kwargs)
    assert _listing(tmp_path) == []


def test_output_folder_that_is_a_file(tiny_model_dir, tmp_path):
    target = tmp_path / "out.onnx"
    target.write_text("keep me")
    with pytest.raises(ExportError, match="is a file"):
        export_model_dir(tiny_model_dir, target)
    assert target.read_text() == "keep me"
    assert _listing(tmp_path) == ["out.onnx"]


def test_failure_midway_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure while exporting the refiner")

    monkeypatch.setattr(export.api, "_export_refiner", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model_dir(tiny_model_dir, out)
    assert _listing(tmp_path) == ["out"]  # no temporary folder left beside it
    assert _listing(out) == ["manifest.json"] and (out / "manifest.json").read_text() == "{}"


def test_stale_files_replaced(model_dir_factory, tiny_export, tmp_path):
    """Exporting a model without FP twin over an older export removes the old twin's file."""
    out = tmp_path / "out"
    out.mkdir()
    for path in [*tiny_export.files.values(), tiny_export.manifest_path]:
        (out / path.name).write_bytes(path.read_bytes())
    model = model_dir_factory(tmp_path / "model", fp_twin=False)
    result = export_model_dir(model, out)
    assert set(result.files) == {"segmentor", "refiner_step"}
    assert _listing(out) == ["manifest.json", "refiner_step.onnx", "segmentor.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == ["segmentor.onnx", "refiner_step.onnx"]


def test_cli_errors_exit_2(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--opset", "9"]) == 2
    assert "unsupported opset 9; supported: 17, 18, 19, 20" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify-export", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_export_with_verify(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(tiny_model_dir), "-o", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "refiner_step.onnx" in text and "passed" in text
    assert _listing(out) == ["manifest.json", "refiner_step.onnx", "refiner_step_fp.onnx",
                             "segmentor.onnx"]


def test_cli_export_whose_verification_fails_exits_1(tiny_model_dir, tmp_path, capsys,
                                                     monkeypatch):
    """Exit 1 (as ``verify-export``), not 2 (bad input): the tolerances are set below 0 so that
    every comparison of a correct export fails; nothing is written."""
    for kind in export.verify.TOLERANCES:
        monkeypatch.setitem(export.verify.TOLERANCES, kind, (-1.0, 0.0, 0.0))
    out = tmp_path / "cli"
    assert main(["export", str(tiny_model_dir), "-o", str(out), "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: verification failed:") and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(VerificationFailed) as caught:
        export_model_dir(tiny_model_dir, out, verify=True)
    assert not caught.value.report.passed and isinstance(caught.value, ExportError)


@pytest.mark.data
def test_cli_verify_export_standalone(tiny_export, tiny_model_dir, kvasir_root):
    """``python -m export.cli verify-export`` in a subprocess, real images, against torch."""
    run = subprocess.run(
        [sys.executable, "-m", "export.cli", "verify-export", str(tiny_export.out_dir),
         "--model", str(tiny_model_dir), "--data", str(kvasir_root), "--max-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "ORT vs torch" in run.stdout and run.stdout.rstrip().endswith("passed")
    print(run.stdout)
