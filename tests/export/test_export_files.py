"""The exported files: valid, self-describing, binary weights +-1, deterministic, dynamic batch."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import MANIFEST, export_model_dir
from export.verify import ort_session
from hidiff.config import preset
from hidiff.layers import BinaryConv2d, BinaryLinear

ROLES = ("segmentor", "refiner_step", "refiner_step_fp")
REQUIRED_KEYS = (
    "format_version", "graph_role", "schedule", "num_steps", "parameterization", "num_classes",
    "labels", "input_size", "normalization", "binarization", "source_commit", "sampler",
    "sampling_steps", "inputs", "outputs",
)


def _load(result, role):
    return onnx.load(str(result.files[role]))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_all_files_written_and_listed(tiny_export):
    assert set(tiny_export.files) == set(ROLES)
    names = sorted(p.name for p in tiny_export.out_dir.iterdir())
    assert names == sorted([MANIFEST, "segmentor.onnx", "refiner_step.onnx",
                            "refiner_step_fp.onnx"])  # no temporary leftovers
    manifest = json.loads(tiny_export.manifest_path.read_text())
    assert manifest["ir_version"] == 10 and manifest["opset"] == 17
    for entry in manifest["files"]:
        path = tiny_export.out_dir / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == _sha(path)
    assert manifest["model"]["num_steps"] == 10
    assert manifest["model"]["sampling_estimate"] == "trajectory"  # the config's
    assert manifest["model"]["binarization"] == "sign(0)=+1;pack=lce-int32-lsb;bit1=-1;pad=+1"


@pytest.mark.parametrize("role", ROLES)
def test_checker_and_strict_shape_inference(tiny_export, role):
    model = _load(tiny_export, role)
    assert model.ir_version == 10
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch


@pytest.mark.parametrize("role", ROLES)
def test_metadata_is_namespaced_and_complete(tiny_export, role):
    model = _load(tiny_export, role)
    meta = {p.key: p.value for p in model.metadata_props}
    assert all(k.startswith("hidiff.") for k in meta)
    for key in REQUIRED_KEYS:
        assert f"hidiff.{key}" in meta, key
    assert meta["hidiff.graph_role"] == role
    assert json.loads(meta["hidiff.inputs"]) == [v.name for v in model.graph.input]
    assert json.loads(meta["hidiff.outputs"]) == [v.name for v in model.graph.output]
    assert json.loads(meta["hidiff.labels"]) == {"background": 0, "foreground": 1}
    assert json.loads(meta["hidiff.normalization"])["std"] == [0.229, 0.224, 0.225]
    assert meta["hidiff.num_steps"] == "10" and meta["hidiff.num_classes"] == "1"
    facts = tiny_export.manifest["model"]
    assert json.loads(meta["hidiff.timesteps"]) == facts["timesteps"]
    assert not any(n.doc_string for n in model.graph.node)  # no paths / stack traces


def test_signatures(tiny_export):
    seg = _load(tiny_export, "segmentor")
    ref = _load(tiny_export, "refiner_step")
    features = [v.name for v in seg.graph.output][1:]
    assert [v.name for v in seg.graph.input] == ["image"]
    assert [v.name for v in seg.graph.output] == ["prior", *features]
    assert features == [f"feature_{i}" for i in range(len(features))]
    assert [v.name for v in ref.graph.input] == ["image", "y_t", "prior", *features, "step"]
    assert [v.name for v in ref.graph.output] == ["probabilities"]
    step = ref.graph.input[-1].type.tensor_type
    assert step.elem_type == onnx.TensorProto.INT64 and len(step.shape.dim) == 1


def _all_nodes(model):
    yield from model.graph.node
    for fn in model.functions:
        yield from fn.node


@pytest.mark.parametrize("role", ROLES)
def test_no_sign_op_and_no_step_mlp(tiny_export, role):
    model = _load(tiny_export, role)
    ops = {n.op_type for n in _all_nodes(model)}
    assert "Sign" not in ops
    if role != "segmentor":
        assert not {"Sin", "Cos"} & ops  # no step embedding: per-step tables gathered by step
        step_users = [n for n in model.graph.node if "step" in n.input]
        assert step_users and all(n.op_type == "Gather" for n in step_users)
        # every table has T + 1 = 11 rows
        inits = {i.name: i for i in model.graph.initializer}
        assert all(inits[n.input[0]].dims[0] == 11 for n in step_users)


def test_binary_weights_are_pm1_and_no_latent_weights(tiny_export, tiny_loaded):
    model = _load(tiny_export, "refiner_step")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    report = tiny_export.conversions["refiner_step"]
    nodes = [n for n in model.graph.node if n.domain == "ai.hidiff"]
    convs = [n for n in nodes if n.op_type == "BinaryConv"]
    linears = [n for n in nodes if n.op_type == "BinaryLinear"]
    assert len(convs) == len(report.binary_convs) > 0
    assert len(linears) == len(report.binary_linears) > 0
    for node in nodes:
        w = inits[node.input[1]]
        assert set(np.unique(w).tolist()) == {-1.0, 1.0}
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["channels_out"], attrs["channels_in"]) == w.shape[:2]
        if node.op_type == "BinaryConv":
            assert attrs["pad_value"] == 1.0 and list(attrs["kernel_shape"]) == [3, 3]
    latent = [m.weight.detach().numpy() for m in tiny_loaded.refiner.modules()
              if isinstance(m, BinaryConv2d | BinaryLinear)]
    stored = {v.tobytes() for v in inits.values()}
    assert not any(w.tobytes() in stored for w in latent)
    # the fp twin has no binary nodes
    fp = _load(tiny_export, "refiner_step_fp")
    assert not [n for n in fp.graph.node if n.domain == "ai.hidiff"] and not fp.functions


def test_deterministic_bytes(tiny_model_dir, tiny_export, tmp_path):
    again = export_model_dir(tiny_model_dir, tmp_path / "again")
    for role, path in tiny_export.files.items():
        assert _sha(path) == _sha(again.files[role]), role
    assert _sha(tiny_export.manifest_path) == _sha(again.manifest_path)


def test_dynamic_batch(tiny_export):
    seg = ort_session(tiny_export.files["segmentor"])
    ref = ort_session(tiny_export.files["refiner_step"])
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    names = [o.name for o in seg.get_outputs()]
    out2 = seg.run(None, {"image": image})
    out1 = seg.run(None, {"image": image[1:]})
    for a, b in zip(out2, out1, strict=True):
        assert a.shape[0] == 2 and b.shape[0] == 1
        np.testing.assert_allclose(a[1:], b, rtol=1e-5, atol=1e-5)
    y = (rng.random(out2[0].shape) < out2[0]).astype(np.float32)
    feed = {"image": image, "y_t": y, "step": np.array([10, 3], np.int64)}
    feed.update(dict(zip(names, out2, strict=True)))
    p2 = ref.run(None, feed)[0]
    p1 = ref.run(None, {k: v[1:] for k, v in feed.items()})[0]
    assert p2.shape == (2, 1, 64, 64) and p1.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(p2[1:], p1, rtol=0, atol=1e-5)


def test_multiclass_pad0_y0_variant(model_dir_factory, tmp_path):
    """K = 3 (softmax prior), zero padding, y0 parameterisation, respaced sampling: exported,
    described, and equal to torch (``export(verify=True)`` fails otherwise)."""
    base = preset("tiny", num_classes=3)
    config = base.replace(
        refiner=dataclasses.replace(base.refiner, pad_value=0.0, parameterization="y0"),
        diffusion=dataclasses.replace(base.diffusion, sampling_steps=4, schedule="linear_abar"),
    )
    model = model_dir_factory(tmp_path / "model", config=config, fp_twin=False,
                              labels={"background": 0, "a": 1, "b": 2})
    result = export_model_dir(model, tmp_path / "out", verify=True)
    assert result.verification.passed
    facts = result.manifest["model"]
    assert facts["binarization"].endswith(";pad=0") and facts["num_classes"] == 3
    assert facts["parameterization"] == "y0" and facts["timesteps"] == [10, 8, 5, 2]
    ref = onnx.load(str(result.files["refiner_step"]))
    pads = {onnx.helper.get_attribute_value(a) for n in ref.graph.node
            if n.op_type == "BinaryConv" for a in n.attribute if a.name == "pad_value"}
    assert pads == {0.0}
    prior = ort_session(result.files["segmentor"]).run(
        None, {"image": np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert prior.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(prior.sum(axis=1), 1.0, atol=1e-6)  # softmax over classes
