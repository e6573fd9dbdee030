"""``hidiff-edge``: predict / info in-process and as ``python -m edge_runtime.cli`` with torch,
hidiff and export unimportable; every user error exits 2 with ``hidiff-edge <cmd>: error: ...``
and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from edge_runtime.cli import main
from reference import memory

BLOCKED = ("torch", "hidiff", "export")


@pytest.fixture(scope="module")
def exported(tiny_export) -> Path:
    return tiny_export[1]


@pytest.fixture
def kvasir_pair(kvasir_root, tmp_path) -> tuple[Path, Path]:
    """A folder with two real images (and one with their masks)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for f in sorted((kvasir_root / "images").glob("*.jpg"))[:2]:
        shutil.copy(f, images / f.name)
        shutil.copy(kvasir_root / "masks" / f.name, masks / f.name)
    return images, masks


def _run(capsys, argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.data
def test_predict_writes_masks_overlays_and_metrics(exported, kvasir_pair, tmp_path, capsys,
                                                   monkeypatch):
    images, masks = kvasir_pair
    out = tmp_path / "out" / "nested"
    kept = []  # predict keeps freed memory in its process (reference.memory)
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: kept.append(True) or True)
    code, stdout, _ = _run(capsys, ["predict", "--model", exported, images, "-o", out,
                                    "--overlay", "--labels", masks, "--seed", "3",
                                    "--steps", "4", "--no-progress"])
    assert code == 0 and kept == [True]
    names = sorted(p.name for p in images.iterdir())
    for name in names:
        stem = Path(name).stem
        with Image.open(images / name) as src, Image.open(out / f"{stem}.png") as mask:
            assert mask.mode == "L" and mask.size == src.size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
        with Image.open(out / f"{stem}_overlay.png") as ov:
            assert ov.mode == "RGB" and ov.size == src.size
        assert any(line.startswith(name) and "dice" in line and "hd95" in line
                   for line in stdout.splitlines())
    assert "mean  dice" in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    # the onnxruntime backend writes the same masks
    other = tmp_path / "ort"
    assert _run(capsys, ["predict", "--model", exported, images, "-o", other, "--seed", "3",
                         "--steps", "4", "--backend", "onnxruntime", "--no-progress"])[0] == 0
    for name in names:
        stem = Path(name).stem
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}.png")),
                              np.asarray(Image.open(other / f"{stem}.png")))


@pytest.mark.data
def test_predict_estimate_option_reaches_the_sampler(exported, kvasir_pair, tmp_path, capsys):
    """``--estimate`` writes what the session predicts with that estimate (the uncertainty PNG
    carries the float spread, which the two estimates give differently at 4 steps)."""
    from edge_runtime import HiDiffSession
    from edge_runtime.images import read_image
    from reference import uncertainty_pixels

    images, _ = kvasir_pair
    session = HiDiffSession(exported)
    first = sorted(images.iterdir())[0]
    rgb = read_image(first)
    spreads = {}
    for estimate in ("last", "trajectory"):
        out = tmp_path / estimate
        code, _, _ = _run(capsys, ["predict", "--model", exported, first, "-o", out, "--seed",
                                   "3", "--steps", "4", "--estimate", estimate, "--uncertainty",
                                   "--no-progress"])
        assert code == 0
        pred = session.predict(rgb, steps=4, seed=3, estimate=estimate)
        assert np.array_equal(np.asarray(Image.open(out / f"{first.stem}.png")),
                              pred.mask * np.uint8(255))
        spreads[estimate] = np.asarray(Image.open(out / f"{first.stem}_uncertainty.png"))
        assert np.array_equal(spreads[estimate], uncertainty_pixels(pred.spread))
    assert not np.array_equal(spreads["last"], spreads["trajectory"])
    with pytest.raises(SystemExit) as err:
        main(["predict", "--model", str(exported), str(first), "-o", str(tmp_path / "bad"),
              "--estimate", "mean"])
    assert err.value.code == 2 and "invalid choice: 'mean'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_info(exported, capsys):
    code, stdout, _ = _run(capsys, ["info", "--model", exported])
    assert code == 0
    manifest = json.loads((exported / "manifest.json").read_text())
    for text in ("T = 10", "K = 1", "64 x 64", "segmentor.onnx", "refiner_step.onnx",
                 "refiner_step_fp.onnx", "ai.hidiff::BinaryConv", "packed kernel", "path",
                 "binary convs on the packed kernel", manifest["model"]["binarization"]):
        assert text in stdout, text
    from edge_runtime import packed
    from edge_runtime.model import load_model
    from edge_runtime.rewrite import rewrite_refiner

    assert f"path {packed.current_path()}" in stdout
    counts = rewrite_refiner(load_model(exported).protos["refiner_step"])[1].counts()
    fired = ", ".join(f"{name} x{n}" for name, n in counts.items() if n)
    assert fired and f"graph rewrites   {fired} (edge_runtime.rewrite)" in stdout


@pytest.mark.data
def test_module_runs_without_torch_hidiff_export(exported, kvasir_pair, tmp_path, run_edge_cli):
    images, _ = kvasir_pair
    out = tmp_path / "out"
    proc = run_edge_cli(["predict", "--model", exported, images, "-o", out, "--steps", "2",
                         "--no-progress"], blocked=BLOCKED)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 2
    proc = run_edge_cli(["info", "--model", exported], blocked=BLOCKED)
    assert proc.returncode == 0 and "T = 10" in proc.stdout, proc.stderr


def test_import_with_torch_blocked(run_edge_cli):
    proc = run_edge_cli(["--help"], blocked=(*BLOCKED, "scipy"))
    assert proc.returncode == 0 and "predict" in proc.stdout, proc.stderr


# -- bad input ---------------------------------------------------------------------------------
def _png16_rgb(path: Path) -> Path:
    """A 48-bit RGB PNG written by hand (PIL would silently read it as 8-bit)."""
    import struct

    h, w = 6, 7
    arr = (np.arange(h * w * 3).reshape(h, w, 3) * 999 % 65535).astype(">u2")
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                       0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _bad_image(kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "unreadable":
        path = folder / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    elif kind == "16-bit":
        path = folder / "deep.png"
        Image.fromarray(np.full((8, 9), 40000, np.uint16)).save(path)
    elif kind == "16-bit RGB":
        path = _png16_rgb(folder / "deep_rgb.png")
    elif kind == "grayscale":
        path = folder / "grey.png"
        Image.fromarray(np.full((8, 9), 100, np.uint8)).save(path)
    else:
        path = folder / "missing.png"
    return path


@pytest.mark.parametrize("kind, words", [
    ("unreadable", "unreadable"), ("16-bit", "16-bit"), ("16-bit RGB", "16-bit"),
    ("grayscale", "grayscale"), ("missing", "no such"),
])
def test_bad_image_exits_2_and_writes_nothing(exported, tmp_path, capsys, kind, words):
    good = tmp_path / "in" / "ok.png"
    good.parent.mkdir()
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(good)
    bad = _bad_image(kind, tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, ["predict", "--model", exported, good, bad, "-o", out,
                                         "--no-progress"])
    assert code == 2
    assert stderr.startswith("hidiff-edge predict: error: ") and bad.name in stderr
    assert words in stderr
    assert not out.exists()


def _model_copy(exported: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    return copy


def _foreign_model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "foreign",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=10), str(path))


def _edit_metadata(path: Path, key: str, value: str) -> None:
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, str(path))


@pytest.mark.parametrize("damage, words", [
    ("truncated", "refiner_step.onnx"),
    ("foreign", "not a hidiff export"),
    ("T", "disagree on T"),
    ("model_id", "disagree on model_id"),
    ("format", "unsupported format_version"),
    ("missing", "missing"),
])
def test_bad_model_exits_2_and_writes_nothing(exported, tmp_path, capsys, damage, words):
    model = _model_copy(exported, tmp_path)
    refiner = model / "refiner_step.onnx"
    if damage == "truncated":
        data = refiner.read_bytes()
        refiner.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        _foreign_model(refiner)
    elif damage == "T":
        _edit_metadata(refiner, "hidiff.num_steps", "12")
    elif damage == "model_id":  # a refiner of another training, its sha256 line removed
        _edit_metadata(refiner, "hidiff.model_id", "0" * 64)
        manifest = json.loads((model / "manifest.json").read_text())
        for entry in manifest["files"]:
            entry.pop("sha256", None)
        (model / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "format":
        manifest = json.loads((model / "manifest.json").read_text())
        manifest["format_version"] = 99
        (model / "manifest.json").write_text(json.dumps(manifest))
    else:
        refiner.unlink()
    image = tmp_path / "ok.png"
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(image)
    out = tmp_path / "out"
    for argv in (["predict", "--model", model, image, "-o", out, "--no-progress"],
                 ["info", "--model", model]):
        code, _, stderr = _run(capsys, argv)
        assert code == 2
        assert stderr.startswith(f"hidiff-edge {argv[0]}: error: "), stderr
        assert words in stderr, stderr
        assert "Traceback" not in stderr
    assert not out.exists()
    if damage == "T":
        assert "refiner_step.onnx" in stderr and "12" in stderr


def test_argument_errors_exit_2(exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["predict", "--model", str(exported), "x.png", "-o", str(tmp_path / "o"),
              "--steps", "0"])
    assert err.value.code == 2
    image = tmp_path / "ok.png"
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(image)
    code, _, stderr = _run(capsys, ["predict", "--model", exported, image, "-o",
                                    tmp_path / "o", "--steps", "11"])
    assert code == 2 and "steps must be an int in 1..10" in stderr
    assert not (tmp_path / "o").exists()
    code, _, stderr = _run(capsys, ["predict", "--model", tmp_path / "nowhere", image, "-o",
                                    tmp_path / "o"])
    assert code == 2 and "no such model folder" in stderr


@pytest.fixture(scope="module")
def grey_export(tmp_path_factory, torch_one_thread) -> Path:
    """A tiny random 1-channel model (a ``generic`` grayscale dataset), exported."""
    from model_factory import make_model_dir

    from export import export_model_dir
    from hidiff.config import preset
    from hidiff.data.info import DatasetInfo

    info = DatasetInfo(name="grey", channel_names=("grey",), mean=(0.5,), std=(0.25,))
    model = make_model_dir(tmp_path_factory.mktemp("grey_model") / "tiny", "tiny",
                           config=preset("tiny", in_channels=1), dataset_info=info)
    out = tmp_path_factory.mktemp("grey_onnx") / "tiny"
    export_model_dir(model, out)
    return out


def test_a_grayscale_model_reads_grey_files_and_refuses_colour(grey_export, tmp_path, capsys):
    """A 1-channel model takes 8-bit grey files (L, LA, bilevel) and RGB files whose channels are
    equal, with the same masks for the same pixels; a colour file is refused by name."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(grey).save(inputs / "l.png")
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(
        inputs / "la.png")
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(inputs / "rgb_grey.png")
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, ["predict", "--model", grey_export, inputs, "-o", out,
                                    "--overlay", "--no-progress"])
    assert code == 0, stderr
    masks = {p.name: np.asarray(Image.open(p)) for p in out.glob("*.png")
             if "_overlay" not in p.name}
    assert sorted(masks) == ["l.png", "la.png", "rgb_grey.png"]
    assert all(m.shape == grey.shape for m in masks.values())
    assert np.array_equal(masks["l.png"], masks["la.png"])
    assert np.array_equal(masks["l.png"], masks["rgb_grey.png"])
    assert np.asarray(Image.open(out / "l_overlay.png")).shape == (*grey.shape, 3)

    colour = inputs / "colour.png"
    Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)).save(colour)
    code, _, stderr = _run(capsys, ["predict", "--model", grey_export, colour, "-o",
                                    tmp_path / "out2", "--no-progress"])
    assert code == 2 and "colour.png" in stderr and "1-channel grayscale" in stderr
    assert not (tmp_path / "out2").exists()
