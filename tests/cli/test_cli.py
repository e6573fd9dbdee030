"""The ``hidiff`` command line end to end, in real subprocesses on real Kvasir-SEG files.

``hidiff train`` (tiny preset, a few steps on four training cases) -> ``hidiff evaluate`` (two
test cases) -> ``hidiff predict`` (two real images), plus the user errors: exit code 2, a message
naming the file, nothing left behind. The commands run as ``python -m hidiff.cli`` from the
repository root, so no installation is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

pytestmark = pytest.mark.data

STEPS = 2  # sampling steps in evaluate/predict (speed)


def hidiff(*args, timeout=240) -> subprocess.CompletedProcess:
    """``python -m hidiff.cli ARGS`` from the repository root.

    One intra-op thread (unless the caller set OMP_NUM_THREADS): the tiny networks gain nothing
    from more, and spinning threads slow the run several-fold on a busy 2-core machine.
    """
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "hidiff.cli", *map(str, args)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def model_dir(kvasir_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    _ok(hidiff("train", "--dataset", "kvasir-seg", "--data", kvasir_root, "--preset", "tiny",
               "--out", out, "--max-steps", 3, "--batch-size", 2, "--limit-cases", 4,
               "--seed", 1, "--fp-twin", "--quiet"))
    return out


@pytest.fixture(scope="module")
def two_images(kvasir_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for path in sorted((kvasir_root / "images").glob("*.jpg"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def test_train_writes_the_model_folder(model_dir):
    for name in ("hidiff_model.json", "config.json", "dataset.json", "split.json",
                 "checkpoint.pt"):
        assert (model_dir / name).is_file(), name
    assert json.loads((model_dir / "config.json").read_text())["preset"] == "tiny"


def test_evaluate_prints_the_three_predictor_table_and_writes_results(model_dir):
    proc = _ok(hidiff("evaluate", model_dir, "--limit", 2, "--steps", STEPS, "--quiet"))
    for row in ("segmentor alone", "HiDiff binary refiner", "HiDiff full-precision refiner"):
        assert row in proc.stdout
    for column in ("Dice", "IoU", "HD95", "recall", "accuracy"):
        assert column in proc.stdout
    out = model_dir / "eval" / "test"
    per_case = json.loads((out / "per_case.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(per_case["cases"]) == 2 and per_case["steps"] == STEPS
    case = per_case["cases"][0]
    image = Image.open(case["image"])
    assert case["size"] == [image.height, image.width]  # metrics at the original resolution
    assert set(case["metrics"]) == {"segmentor", "hidiff_binary", "hidiff_fp"}
    assert set(case["metrics"]["segmentor"]) == {"dice", "iou", "hd95", "recall", "accuracy"}
    assert summary["n_cases"] == 2 and summary["seed"] == 0 and summary["steps"] == STEPS
    for entry in summary["predictors"].values():
        assert entry["available"] and entry["wall_time_s"] > 0
        assert entry["metrics"]["dice"]["n"] == 2
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == sorted(c["case_id"] for c in per_case["cases"])
    assert Image.open(overlays[0]).width > 3 * Image.open(overlays[0]).height  # 4 panels
    # several steps: the chain estimate is recorded and printed (the model's default here)
    assert summary["estimate"] == per_case["estimate"] == "trajectory"
    assert "trajectory estimate" in proc.stdout


def test_evaluate_estimate_option_is_recorded_and_checked(model_dir, tmp_path):
    out = tmp_path / "last"
    proc = _ok(hidiff("evaluate", model_dir, "--limit", 1, "--steps", STEPS, "--estimate", "last",
                      "--overlays", 0, "--out", out, "--quiet"))
    assert "last estimate" in proc.stdout
    assert json.loads((out / "per_case.json").read_text())["estimate"] == "last"
    bad = hidiff("evaluate", model_dir, "--estimate", "mean")
    assert bad.returncode == 2 and "invalid choice: 'mean'" in bad.stderr


@pytest.mark.parametrize(("given", "used"), [("last", "last"), (None, "trajectory")])
def test_evaluate_estimate_reaches_every_prediction(model_dir, tmp_path, monkeypatch, given,
                                                    used):
    from hidiff import evaluation
    from hidiff.pipeline import HiDiffPipeline

    seen = []
    real = HiDiffPipeline.predict_image

    def recording(self, image, **kwargs):
        seen.append(kwargs.get("estimate"))
        return real(self, image, **kwargs)

    monkeypatch.setattr(HiDiffPipeline, "predict_image", recording)
    summary = evaluation.evaluate(model_dir, out=tmp_path / "e", steps=STEPS, samples=1,
                                  limit=1, overlays=0, estimate=given, progress=False)
    assert summary["estimate"] == used  # None: the model's config
    assert seen and set(seen) == {used}


def test_predict_writes_masks_of_the_original_size(model_dir, two_images, tmp_path):
    out = tmp_path / "masks"
    _ok(hidiff("predict", model_dir, two_images, "-o", out, "--steps", STEPS, "--quiet"))
    inputs = sorted(two_images.glob("*.jpg"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.stem + ".png" for p in inputs)
    for path in inputs:
        mask = Image.open(out / f"{path.stem}.png")
        assert mask.size == Image.open(path).size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    # a single file, the segmentor alone
    single = tmp_path / "single"
    _ok(hidiff("predict", model_dir, inputs[0], "-o", single, "--refiner", "none", "--quiet"))
    assert [p.name for p in single.iterdir()] == [inputs[0].stem + ".png"]


def test_predict_estimate_option_writes_that_estimates_prediction(model_dir, two_images,
                                                                   tmp_path):
    """``hidiff predict --estimate E`` writes what the pipeline predicts with estimate E (the
    uncertainty PNG carries the float spread, which differs between the estimates at 4 steps);
    an unknown estimate exits 2 before anything is written."""
    import torch

    from hidiff.predict import pipeline_from_model_dir, read_image
    from reference import uncertainty_pixels

    first = sorted(two_images.glob("*.jpg"))[0]
    _, pipe = pipeline_from_model_dir(model_dir)
    spreads = {}
    for estimate in ("last", "trajectory"):
        out = tmp_path / estimate
        _ok(hidiff("predict", model_dir, first, "-o", out, "--steps", 4, "--seed", 3,
                   "--estimate", estimate, "--uncertainty", "--quiet"))
        threads = torch.get_num_threads()
        # the subprocess's thread count (hidiff()): the same float sums, bit for bit
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        try:
            pred = pipe.predict_image(read_image(first, 3), steps=4, seed=3, estimate=estimate)
        finally:
            torch.set_num_threads(threads)
        assert np.array_equal(np.asarray(Image.open(out / f"{first.stem}.png")),
                              pred.mask * np.uint8(255))
        spreads[estimate] = np.asarray(Image.open(out / f"{first.stem}_uncertainty.png"))
        assert np.array_equal(spreads[estimate], uncertainty_pixels(pred.spread))
    assert not np.array_equal(spreads["last"], spreads["trajectory"])
    bad = hidiff("predict", model_dir, first, "-o", tmp_path / "bad", "--estimate", "mean")
    assert bad.returncode == 2 and "invalid choice: 'mean'" in bad.stderr
    assert not (tmp_path / "bad").exists()

def _gray_png(path: Path) -> Path:
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind", ["empty folder", "garbage jpg", "grayscale"])
def test_predict_bad_input_exits_2_naming_the_file(model_dir, two_images, tmp_path, kind):
    if kind == "empty folder":
        bad = tmp_path / "empty"
        bad.mkdir()
        inputs = [bad]
    elif kind == "garbage jpg":
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(np.random.default_rng(0).bytes(2000))
        inputs = [two_images, bad]  # good images first: still nothing may be written
    else:
        bad = _gray_png(tmp_path / "gray.png")
        inputs = [bad]
    out = tmp_path / "out"
    proc = hidiff("predict", model_dir, *inputs, "-o", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("hidiff predict: error: ")
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_evaluate_without_checkpoint_exits_2_naming_it(model_dir, tmp_path):
    broken = tmp_path / "no_checkpoint"
    broken.mkdir()
    for path in model_dir.glob("*.json"):
        shutil.copy(path, broken / path.name)
    proc = hidiff("evaluate", broken)
    assert proc.returncode == 2
    assert proc.stderr.startswith("hidiff evaluate: error: ")
    assert str(broken / "checkpoint.pt") in proc.stderr and "Traceback" not in proc.stderr


def test_describe_prints_a_table():
    proc = _ok(hidiff("describe", "--preset", "tiny"))
    assert "preset 'tiny'" in proc.stdout
    assert "params 1-bit" in proc.stdout and "refiner step (cached)" in proc.stdout


def test_commands_keep_freed_memory_first(monkeypatch, capsys, tmp_path):
    """hidiff's commands (and python -m hidiff.training) set the allocator policy of
    reference.memory before they work; a usage error exits before."""
    from hidiff import cli
    from hidiff.training import __main__ as training_main
    from reference import memory

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("hidiff") or True)
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("training") or True)
    assert cli.main(["predict", "somewhere"]) == 2 and calls == []
    assert cli.main(["describe", "--preset", "tiny"]) == 0 and calls == ["hidiff"]
    # a training run that stops at once on bad input still set the policy first
    assert training_main.main(["--dataset", "kvasir-seg", "--data", str(tmp_path / "missing"),
                               "--preset", "tiny", "--out", str(tmp_path / "run"),
                               "--max-steps", "1"]) == 2
    assert calls == ["hidiff", "training"]
    capsys.readouterr()


def test_usage_errors_and_interrupt_in_process(monkeypatch, capsys):
    from hidiff import cli

    assert cli.main([]) == 2
    assert cli.main(["predict", "somewhere"]) == 2  # -o and INPUT missing
    assert cli.main(["describe", "--preset", "nope"]) == 2
    assert "hidiff describe: error: unknown preset 'nope'" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hidiff.describe.describe", interrupted)
    assert cli.main(["describe", "--preset", "tiny"]) == 130


def test_predict_failing_midway_removes_the_folders_it_created(model_dir, two_images, tmp_path,
                                                                monkeypatch):
    from hidiff.pipeline import HiDiffPipeline
    from hidiff.predict import predict_paths

    def broken(self, image, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HiDiffPipeline, "predict_image", broken)
    out = tmp_path / "new" / "masks"
    with pytest.raises(KeyboardInterrupt):
        predict_paths(model_dir, [two_images], out=out, progress=False)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(KeyboardInterrupt):
        predict_paths(model_dir, [two_images], out=existing, progress=False)
    assert existing.is_dir() and not any(existing.iterdir())


def test_predict_refuses_existing_outputs_unless_overwrite(model_dir, two_images, tmp_path):
    out = tmp_path / "masks"
    args = ("predict", model_dir, two_images, "-o", out, "--steps", 1, "--samples", 1, "--quiet")
    _ok(hidiff(*args))
    first = sorted(out.iterdir())[0]
    first.write_bytes(b"an earlier result")
    proc = hidiff(*args)
    assert proc.returncode == 2 and f"{first}: already exists; pass --overwrite" in proc.stderr
    assert first.read_bytes() == b"an earlier result"
    _ok(hidiff(*args, "--overwrite"))
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = hidiff("predict", model_dir, two_images, "-o", out, "--seed", "-1")
    assert proc.returncode == 2 and "--seed" in proc.stderr and "must be >= 0" in proc.stderr


def test_predict_reads_exif_rotated_photos_upright(model_dir, kvasir_root, tmp_path):
    src = sorted((kvasir_root / "images").glob("*.jpg"))[2]
    with Image.open(src) as im:
        upright = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; a viewer turns it upright
    photo = tmp_path / "in" / "photo.jpg"
    photo.parent.mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, exif=exif, quality=95)
    out = tmp_path / "out"
    _ok(hidiff("predict", model_dir, photo, "-o", out, "--steps", 1, "--samples", 1, "--quiet"))
    with Image.open(out / "photo.png") as mask:
        assert mask.size == upright.size  # the upright frame (W, H), not the stored one


def test_evaluate_failing_midway_leaves_no_overlays(model_dir, tmp_path, monkeypatch):
    from hidiff import evaluation
    from hidiff.pipeline import HiDiffPipeline

    calls = {"n": 0}
    real = HiDiffPipeline.predict_image

    def fails_on_the_second_case(self, image, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # after the first case (and its overlay)
            raise ValueError("a corrupt case")
        return real(self, image, **kwargs)

    monkeypatch.setattr(HiDiffPipeline, "predict_image", fails_on_the_second_case)
    out = tmp_path / "eval" / "test"
    with pytest.raises(ValueError, match="a corrupt case"):
        evaluation.evaluate(model_dir, out=out, steps=1, samples=1, limit=2, overlays=2,
                            progress=False)
    assert not (tmp_path / "eval").exists()


def _png48(path: Path, height: int = 6, width: int = 7) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow reads it as 8-bit RGB, silently)."""
    import struct
    import zlib

    rows = (np.arange(height * width * 3).reshape(height, width, 3) * 997).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_predict_refuses_48_bit_png_like_hidiff_edge(model_dir, tmp_path):
    deep = _png48(tmp_path / "deep.png")
    proc = hidiff("predict", model_dir, deep, "-o", tmp_path / "out")
    assert proc.returncode == 2 and f"{deep}: 16-bit colour PNG" in proc.stderr
    assert not (tmp_path / "out").exists()
