"""``hidiff-edge quantize`` / ``segmentor="int8"`` / ``refiner_static="int8"``: real int8 graphs
from onnxruntime's static quantization of a real export, calibrated on real image files; listed in
the manifest and checked like every graph; both backends bit-identical on them; every user error
exits 2 with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import reference
from edge_runtime import HiDiffSession
from edge_runtime.cli import main
from edge_runtime.errors import EdgeError, ModelError
from edge_runtime.images import as_float_image
from edge_runtime.model import load_model, read_metadata
from edge_runtime.quantize import INT8_ROLE, STATIC_INT8_ROLE, quantize_model, quantize_segmentor

BLOCKED = ("torch", "hidiff", "export")


def _images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` smooth RGB photos-like PNGs (blobs on a gradient), natural names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:112] / 96.0
    for i in range(count):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float64)
        rgb = np.stack([0.3 + 0.5 * blob, 0.2 + 0.3 * yy, 0.4 * xx + 0.2 * blob], -1)
        rgb += rng.normal(0, 0.03, rgb.shape)
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def quantized(tiny_export, tmp_path_factory) -> Path:
    """A copy of the tiny export with both int8 graphs calibrated on 6 images."""
    out = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(tiny_export[1], out)
    calib = _images(tmp_path_factory.mktemp("calib"), 6)
    quantize_model(out, images_from=[calib], max_images=6)
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_int8_graph_is_listed_checked_and_tied_to_its_training(quantized, tiny_export):
    manifest = json.loads((quantized / "manifest.json").read_text())
    entry = next(e for e in manifest["files"] if e["role"] == INT8_ROLE)
    data = (quantized / "segmentor_int8.onnx").read_bytes()
    assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["quantization"]["calibration_images"] == 6
    proto = onnx.load(str(quantized / "segmentor_int8.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized (QDQ)
    meta, fp = read_metadata(proto), read_metadata(onnx.load(str(quantized / "segmentor.onnx")))
    assert meta["graph_role"] == INT8_ROLE and meta["model_id"] == fp["model_id"]
    assert meta["quantization"]["weights"] == "int8 per channel"
    model = load_model(quantized, roles=(INT8_ROLE, "refiner_step"))
    assert set(model.files) == {"segmentor", INT8_ROLE, "refiner_step"}
    # the original export is untouched and has no int8 graph
    with pytest.raises(ModelError, match="no int8 segmentor graph; make one with hidiff-edge "
                                         "quantize"):
        HiDiffSession(tiny_export[1], segmentor="int8")


def test_int8_segmentor_predicts_close_to_fp32_and_backends_agree(quantized, tmp_path):
    rgb = np.asarray(Image.open(_images(tmp_path / "new", 1, seed=7) / "img0.png"))
    fp32 = HiDiffSession(quantized, backend="onnxruntime").predict(rgb, seed=3)
    ort8 = HiDiffSession(quantized, backend="onnxruntime", segmentor="int8").predict(rgb, seed=3)
    packed8 = HiDiffSession(quantized, backend="packed", segmentor="int8").predict(rgb, seed=3)
    # same int8 segmentor outputs into both refiner backends: bit-identical
    np.testing.assert_array_equal(packed8.mask, ort8.mask)
    np.testing.assert_array_equal(packed8.prob, ort8.prob)
    # int8 changes the prior by a quantization error, not its content (random tiny network:
    # 8-bit activations over min-max ranges of 6 calibration images)
    assert not np.array_equal(ort8.prior, fp32.prior)
    assert np.abs(ort8.prior - fp32.prior).mean() < 0.05
    assert np.corrcoef(ort8.prior.ravel(), fp32.prior.ravel())[0, 1] > 0.9


def test_session_segmentor_choice_is_checked(quantized):
    with pytest.raises(EdgeError, match="segmentor must be one of fp32, int8; got 'int4'"):
        HiDiffSession(quantized, segmentor="int4")


def test_tampered_int8_graph_is_refused(quantized, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(quantized, copy)
    data = bytearray((copy / "segmentor_int8.onnx").read_bytes())
    # flip a byte inside the largest weight: still a valid graph, only the hash can tell
    proto = onnx.load(str(copy / "segmentor_int8.onnx"))
    raw = max((init.raw_data for init in proto.graph.initializer), key=len)
    at = bytes(data).index(raw) + len(raw) // 2
    data[at] ^= 0x01
    (copy / "segmentor_int8.onnx").write_bytes(bytes(data))
    onnx.load(str(copy / "segmentor_int8.onnx"))  # parses
    with pytest.raises(ModelError, match="segmentor_int8.onnx: sha256 differs"):
        HiDiffSession(copy, segmentor="int8")
    HiDiffSession(copy)  # the fp32 path does not read it


def test_cli_quantize_torch_free_then_refuses_again_without_overwrite(tiny_export, tmp_path,
                                                                       run_edge_cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_export[1], model)
    calib = _images(tmp_path / "calib", 3)
    done = run_edge_cli(["quantize", "--model", model, calib, "--no-progress"], blocked=BLOCKED)
    assert done.returncode == 0, done.stderr
    assert "segmentor_int8.onnx" in done.stderr and "--segmentor int8" in done.stderr
    assert "refiner_static_int8.onnx" in done.stderr and "--refiner-static int8" in done.stderr
    info = run_edge_cli(["info", "--model", model, "--segmentor", "int8"], blocked=BLOCKED)
    assert info.returncode == 0, info.stderr
    assert "segmentor int8" in info.stdout and "segmentor_int8.onnx" in info.stdout
    before = _digest(model)
    again = run_edge_cli(["quantize", "--model", model, calib, "--no-progress"], blocked=BLOCKED)
    assert again.returncode == 2
    assert "segmentor_int8.onnx: this model already has an int8 segmentor; pass --overwrite" \
        in again.stderr
    assert _digest(model) == before
    forced = run_edge_cli(["quantize", "--model", model, calib, "--max-images", "2",
                           "--overwrite", "--no-progress"], blocked=BLOCKED)
    assert forced.returncode == 0, forced.stderr
    files = json.loads((model / "manifest.json").read_text())["files"]
    for role in (INT8_ROLE, STATIC_INT8_ROLE):  # both replaced, each listed once
        entries = [e for e in files if e["role"] == role]
        assert len(entries) == 1 and entries[0]["quantization"]["calibration_images"] == 2


@pytest.mark.parametrize("problem", ["empty", "bad_image", "no_model"])
def test_cli_quantize_errors_leave_nothing_behind(tiny_export, tmp_path, capsys, problem):
    model = tmp_path / "model"
    shutil.copytree(tiny_export[1], model)
    calib = tmp_path / "calib"
    calib.mkdir()
    if problem == "bad_image":
        _images(calib, 2)
        (calib / "img1.png").write_bytes(b"not a png")
    target = tmp_path / "missing" if problem == "no_model" else model
    before = _digest(model)
    code = main(["quantize", "--model", str(target), str(calib), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hidiff-edge quantize: error: ")
    expected = {"empty": str(calib), "bad_image": "img1.png", "no_model": "no such model folder"}
    assert expected[problem] in err
    assert _digest(model) == before
    assert not [p for p in model.iterdir() if p.name.startswith(".")]


def test_reexport_removes_a_stale_int8_segmentor(quantized, tiny_export, tmp_path):
    from export import export_model_dir

    copy = tmp_path / "model"
    shutil.copytree(quantized, copy)
    export_model_dir(tiny_export[0], copy)
    assert not (copy / "segmentor_int8.onnx").exists()
    assert not (copy / "refiner_static_int8.onnx").exists()
    assert not {INT8_ROLE, STATIC_INT8_ROLE} & {e["role"] for e in json.loads(
        (copy / "manifest.json").read_text())["files"]}


def test_quantize_takes_repeated_stems_replaces_leftovers_and_reports_progress(tiny_export,
                                                                                tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_export[1], model)
    (model / "segmentor_int8.onnx").write_bytes(b"left over by a killed run")  # not listed
    first, second = _images(tmp_path / "a", 2, seed=1), _images(tmp_path / "b", 2, seed=2)
    calls = []
    path = quantize_segmentor(model, images_from=[first, second], max_images=3,
                              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # img0, img1 of a/, img0 of b/: stems repeat
    HiDiffSession(model, segmentor="int8")  # the listed graph is the new one (hash checked)
    assert path.read_bytes() != b"left over by a killed run"
    assert not [p for p in model.iterdir() if p.name.startswith(".")]


# -- the refiner's per-image (static) part in int8 -------------------------------------------------
def _rewrite_graph(folder: Path, role: str, edit) -> None:
    """Edit the graph of ``role`` with ``edit(proto)`` and record its new bytes and sha256 (so
    that only the check under test can refuse it)."""
    path = folder / f"{role}.onnx"
    proto = onnx.load(str(path))
    edit(proto)
    data = proto.SerializeToString()
    path.write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["role"] == role:
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_static_int8_graph_quantizes_the_level_convs_and_keeps_attention_float(quantized):
    manifest = json.loads((quantized / "manifest.json").read_text())
    entries = {e["role"]: e for e in manifest["files"]}
    entry = entries[STATIC_INT8_ROLE]
    data = (quantized / "refiner_static_int8.onnx").read_bytes()
    assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["refiner_sha256"] == entries["refiner_step"]["sha256"]
    record = entry["quantization"]
    assert record["calibration_images"] == 6 and record["refiner_sha256"] == entry[
        "refiner_sha256"]
    proto = onnx.load(str(quantized / "refiner_static_int8.onnx"))
    meta = read_metadata(proto)
    assert meta["graph_role"] == STATIC_INT8_ROLE and meta["quantization"] == record
    assert meta["model_id"] == read_metadata(onnx.load(str(quantized / "refiner_step.onnx")))[
        "model_id"]
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    int8 = [n for n in convs if n.input[1] in producer
            and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(int8) == record["convolutions"] >= 1
    assert len(convs) - len(int8) == record["float_convolutions"]
    # the float ones are exactly those feeding the X-Former's attention
    feeding = set()
    todo = [i for n in proto.graph.node if n.op_type in ("MatMul", "Softmax") for i in n.input]
    while todo:
        name = todo.pop()
        if name not in feeding:
            feeding.add(name)
            todo.extend(producer[name].input if name in producer else [])
    assert {n.name for n in convs if n.output[0] in feeding} == {
        n.name for n in convs if n not in int8}
    # by name: the X-Former's projection, and only it
    assert {n.name for n in convs if n not in int8} == {"/refiner/xformer_proj/Conv"}


def test_static_int8_backends_bit_identical_and_close_to_fp32(quantized, tmp_path):
    rgb = np.asarray(Image.open(_images(tmp_path / "new", 1, seed=9) / "img0.png"))
    packed = HiDiffSession(quantized, backend="packed", segmentor="int8", refiner_static="int8")
    ort = HiDiffSession(quantized, backend="onnxruntime", segmentor="int8",
                        refiner_static="int8")
    a, b = packed.predict(rgb, seed=5), ort.predict(rgb, seed=5)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.prob, b.prob)
    assert packed.describe()["refiner_static"] == "int8"
    # the static part's values: a quantization error away from the fp32 graph's, not others
    fp = HiDiffSession(quantized, backend="onnxruntime")
    x = reference.network_inputs(as_float_image(rgb, 3), fp.facts.preprocessing).astype(
        np.float32)  # an image like the calibration ones (int8 clips outside their ranges)
    values = {"image": x, **fp.segment(x)}
    want, got = fp.refiner.prepare(values), ort.refiner.prepare(values)
    changed = 0
    for name in fp.refiner.split.static.outputs:
        u, v = want[name], got[name]
        scale = np.abs(u).max()
        # 8-bit activations over min-max ranges of 6 calibration images: 1-1.5 % of the value's
        # range measured on this random tiny network; 5 % allowed
        assert np.abs(u - v).max() <= 0.05 * scale + 1e-6, name
        changed += not np.array_equal(u, v)
    assert changed >= 1


def test_static_int8_choice_and_missing_graph_are_refused(quantized, tiny_export):
    with pytest.raises(EdgeError, match="refiner_static must be one of fp32, int8; got 'int4'"):
        HiDiffSession(quantized, refiner_static="int4")
    with pytest.raises(EdgeError, match="needs refiner='binary', not 'fp'"):
        HiDiffSession(quantized, refiner="fp", refiner_static="int8")
    with pytest.raises(ModelError, match="no int8 refiner static part; make one with "
                                         "hidiff-edge quantize"):
        HiDiffSession(tiny_export[1], refiner_static="int8")


def test_static_int8_from_another_refiner_or_split_is_refused(quantized, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(quantized, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["role"] == STATIC_INT8_ROLE:
            entry["refiner_sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="refiner_static_int8.onnx: made from another "
                                         "refiner_step.onnx"):
        HiDiffSession(stale, refiner_static="int8")
    HiDiffSession(stale)  # the fp32 path does not read it

    other = tmp_path / "other"
    shutil.copytree(quantized, other)

    def rename_output(proto):  # as a runtime that splits the graph differently would name it
        old = proto.graph.output[0].name
        for node in proto.graph.node:
            node.output[:] = [o + "_x" if o == old else o for o in node.output]
            node.input[:] = [i + "_x" if i == old else i for i in node.input]
        proto.graph.output[0].name = old + "_x"

    _rewrite_graph(other, STATIC_INT8_ROLE, rename_output)
    with pytest.raises(ModelError, match="refiner_static_int8.onnx: its signature .* is not "
                                         "this runtime's static part"):
        HiDiffSession(other, refiner_static="int8")
    HiDiffSession(other)

    def record_other_part(proto):  # made from a part that computes something else
        meta = {p.key: p for p in proto.metadata_props}
        record = json.loads(meta["hidiff.quantization"].value)
        meta["hidiff.quantization"].value = json.dumps(dict(record, static_part_sha256="0" * 64))

    changed = tmp_path / "changed"
    shutil.copytree(quantized, changed)
    _rewrite_graph(changed, STATIC_INT8_ROLE, record_other_part)
    with pytest.raises(ModelError, match="refiner_static_int8.onnx: it was made from a static "
                                         "part that computes something else"):
        HiDiffSession(changed, refiner_static="int8")
    HiDiffSession(changed)

    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    _rewrite_graph(broken, STATIC_INT8_ROLE,  # a node reading a value nothing makes
                   lambda proto: proto.graph.node[-1].input.append("nowhere"))
    with pytest.raises(ModelError, match="refiner_static_int8.onnx: onnxruntime cannot load it"):
        HiDiffSession(broken, refiner_static="int8")
    HiDiffSession(broken)

    foreign = tmp_path / "foreign"
    shutil.copytree(quantized, foreign)
    _rewrite_graph(foreign, STATIC_INT8_ROLE,
                   lambda proto: setattr(proto.graph.input[0], "name", "y_t"))
    with pytest.raises(ModelError, match="refiner_static_int8.onnx: inputs .* are not among the "
                                         "refiner's per-image inputs"):
        HiDiffSession(foreign, refiner_static="int8")
    HiDiffSession(foreign)


def test_cli_quantize_parts_predict_and_all_or_nothing_refusal(tiny_export, tmp_path,
                                                               run_edge_cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_export[1], model)
    calib = _images(tmp_path / "calib", 3)
    first = run_edge_cli(["quantize", "--model", model, calib, "--part", "segmentor",
                          "--no-progress"], blocked=BLOCKED)
    assert first.returncode == 0, first.stderr
    assert not (model / "refiner_static_int8.onnx").exists()
    before = _digest(model)
    # both parts asked, one already there: refused before the other is made
    again = run_edge_cli(["quantize", "--model", model, calib, "--no-progress"],
                         blocked=BLOCKED)
    assert again.returncode == 2
    assert "segmentor_int8.onnx: this model already has an int8 segmentor" in again.stderr
    assert _digest(model) == before
    static = run_edge_cli(["quantize", "--model", model, calib, "--part", "refiner_static",
                           "--no-progress"], blocked=BLOCKED)
    assert static.returncode == 0, static.stderr
    before = _digest(model)
    refused = run_edge_cli(["quantize", "--model", model, calib, "--part", "refiner_static",
                            "--no-progress"], blocked=BLOCKED)
    assert refused.returncode == 2 and _digest(model) == before
    assert "refiner_static_int8.onnx: this model already has an int8 refiner static part; " \
           "pass --overwrite" in refused.stderr
    replaced = run_edge_cli(["quantize", "--model", model, calib, "--part", "refiner_static",
                             "--overwrite", "--no-progress"], blocked=BLOCKED)
    assert replaced.returncode == 0, replaced.stderr
    assert "refiner_static_int8.onnx" in replaced.stderr and "--refiner-static int8" in \
        replaced.stderr
    roles = [e["role"] for e in json.loads((model / "manifest.json").read_text())["files"]]
    assert roles.count(INT8_ROLE) == roles.count(STATIC_INT8_ROLE) == 1
    info = run_edge_cli(["info", "--model", model, "--refiner-static", "int8"], blocked=BLOCKED)
    assert info.returncode == 0, info.stderr
    assert "refiner static int8" in info.stdout and "refiner_static_int8.onnx" in info.stdout
    out = tmp_path / "out"
    done = run_edge_cli(["predict", "--model", model, calib / "img0.png", "-o", out,
                         "--segmentor", "int8", "--refiner-static", "int8", "--no-progress"],
                        blocked=BLOCKED)
    assert done.returncode == 0, done.stderr
    assert (out / "img0.png").is_file()
    bad = run_edge_cli(["quantize", "--model", model, calib, "--part", "refiner"],
                       blocked=BLOCKED)
    assert bad.returncode == 2 and "invalid choice: 'refiner'" in bad.stderr


def test_quantize_model_checks_its_arguments(quantized):
    with pytest.raises(ValueError, match="parts must be a non-empty sequence of segmentor, "
                                         "refiner_static; got"):
        quantize_model(quantized, images_from=[quantized], parts=("prior",))
    with pytest.raises(ValueError, match="parts must be"):
        quantize_model(quantized, images_from=[quantized], parts="segmentor")


def test_a_failing_second_part_leaves_the_folder_as_it_was(tiny_export, tmp_path, monkeypatch):
    from edge_runtime import quantize

    model = tmp_path / "model"
    shutil.copytree(tiny_export[1], model)
    calib = _images(tmp_path / "calib", 2)
    before = _digest(model)
    calls = []

    def failing(model_, files, progress):  # the refiner's part fails after the segmentor's
        raise ModelError(model_.files["refiner_step"], "injected failure")

    monkeypatch.setitem(quantize._MAKERS, STATIC_INT8_ROLE, failing)
    with pytest.raises(ModelError, match="injected failure"):
        quantize_model(model, images_from=calib, progress=lambda *a: calls.append(a))
    assert calls == [("segmentor", 1, 2), ("segmentor", 2, 2)]  # the first part was made
    assert _digest(model) == before  # and nothing written
    assert not [p for p in model.iterdir() if p.name.startswith(".")]


def test_static_int8_on_a_tile_policy_export(tiny_tile_export, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_tile_export[1], model)
    calls = []
    paths = quantize_model(model, images_from=[_images(tmp_path / "calib", 2)],
                           parts=("refiner_static",), progress=lambda *a: calls.append(a))
    assert [p.name for p in paths] == ["refiner_static_int8.onnx"]
    assert calls == [("refiner_static", 1, 2), ("refiner_static", 2, 2)]
    rgb = np.asarray(Image.open(_images(tmp_path / "new", 1, seed=4) / "img0.png"))
    a = HiDiffSession(model, backend="packed", refiner_static="int8").predict(rgb, seed=2)
    b = HiDiffSession(model, backend="onnxruntime", refiner_static="int8").predict(rgb, seed=2)
    np.testing.assert_array_equal(a.prob, b.prob)  # tiles, overlap: the same int8 values


def test_content_digest_follows_what_the_part_computes(tiny_export):
    from onnx import numpy_helper

    from edge_runtime.graph import content_digest
    from edge_runtime.quantize import static_part

    proto = load_model(tiny_export[1]).protos["refiner_step"]
    part = static_part(proto).model
    digest = content_digest(part)
    assert content_digest(static_part(proto).model) == digest  # the same split, again
    renamed = onnx.load_from_string(part.SerializeToString())  # a serialization round trip
    for i, node in enumerate(renamed.graph.node):
        node.name, node.doc_string = f"other{i}", "words"
    assert content_digest(renamed) == digest  # names and doc strings do not count
    init = max(renamed.graph.initializer, key=lambda t: t.ByteSize())
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = np.nextafter(array.flat[0], np.float32(np.inf))  # one ulp of one weight
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    assert content_digest(renamed) != digest
