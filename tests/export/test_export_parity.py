"""onnxruntime against torch and against onnx.reference, on real Kvasir-SEG images.

Tolerances, and why:

* ``PRIOR_ATOL``: the prior is a probability computed by the same float32 convolutions summed in
  another order (MLAS vs oneDNN), measured ~2e-7.
* ``FEATURE_RTOL``: features are unnormalised activations; relative to their largest magnitude,
  measured ~1e-5 at most.
* ``PROB_ATOL``: the refiner's output probabilities. Its binary layers are exact given the same
  input (``test_binary_nodes_are_exact_inside_the_graph``), but the real layers feeding them
  round differently, and an input within rounding of 0 can binarize the other way; measured
  ~1e-6 on these inputs (no flip), so 1e-4 leaves room for one flip's local effect.
* ``REF_EVAL_ATOL``: onnx.reference (NumPy) against ORT on the same graph: float32 rounding in
  different kernels, the same arguments as above.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import reference
from export.graphs import RefinerStepGraph, SegmentorGraph, refiner_feature_indices
from export.verify import ort_session

PRIOR_ATOL = 1e-5
FEATURE_RTOL = 1e-4
PROB_ATOL = 1e-4
REF_EVAL_ATOL = 1e-4

pytestmark = pytest.mark.data


def _segment(tiny_export, images):
    session = ort_session(tiny_export.files["segmentor"])
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, {"image": images})


def _refiner_feed(names, seg_out, images, steps, seed=0):
    prior = seg_out[0]
    u = reference.draw_uniforms(seed, prior.shape, 1)[0]
    feed = {"image": images, "y_t": (u < prior).astype(np.float32),
            "step": np.asarray(steps, np.int64)}
    feed.update(dict(zip(names, seg_out, strict=True)))
    return feed


def _torch_step(loaded, refiner, feed, names):
    graph = RefinerStepGraph(refiner, refiner_feature_indices(refiner),
                             len(loaded.segmentor.feature_strides))
    args = [torch.from_numpy(feed[k]) for k in ("image", "y_t", "prior", *names[1:], "step")]
    with torch.no_grad():
        return graph(*args).numpy()


def test_segmentor_ort_matches_torch(tiny_export, tiny_loaded, kvasir_images):
    names, got = _segment(tiny_export, kvasir_images)
    graph = SegmentorGraph(tiny_loaded.segmentor, refiner_feature_indices(tiny_loaded.refiner))
    with torch.no_grad():
        expected = [t.numpy() for t in graph(torch.from_numpy(kvasir_images))]
    diffs = {}
    for name, a, b in zip(names, got, expected, strict=True):
        assert a.shape == b.shape
        diffs[name] = float(np.abs(a - b).max())
        tol = PRIOR_ATOL if name == "prior" else FEATURE_RTOL * float(np.abs(b).max())
        assert diffs[name] <= tol, (name, diffs[name], tol)
    print("segmentor ORT vs torch max|diff|:", diffs)


@pytest.mark.parametrize("role", ["refiner_step", "refiner_step_fp"])
def test_refiner_step_ort_matches_torch(tiny_export, tiny_loaded, kvasir_images, role):
    names, seg_out = _segment(tiny_export, kvasir_images)
    session = ort_session(tiny_export.files[role])
    refiner = tiny_loaded.refiner if role == "refiner_step" else tiny_loaded.refiner_fp
    worst = 0.0
    for steps in ([10, 9], [5, 1], [2, 7]):  # a different original step per sample
        feed = _refiner_feed(names, seg_out, kvasir_images, steps)
        got = session.run(None, feed)[0]
        expected = _torch_step(tiny_loaded, refiner, feed, names)
        assert got.shape == expected.shape == seg_out[0].shape
        assert 0.0 <= got.min() and got.max() <= 1.0
        assert np.std(expected) > 1e-3  # the random refiner says something
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"{role} ORT vs torch max|diff|: {worst:.3g}")
    assert worst <= PROB_ATOL


def _with_intermediate_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """A copy exposing the input X and output Y of every ai.hidiff node as graph outputs."""
    test = onnx.ModelProto()
    test.CopyFrom(model)
    nodes = [n for n in test.graph.node if n.domain == "ai.hidiff"]
    seen = {o.name for o in test.graph.output}
    for node in nodes:
        for name in (node.input[0], node.output[0]):
            if name not in seen:
                test.graph.output.append(
                    helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                seen.add(name)
    return test, nodes


def test_binary_nodes_are_exact_inside_the_graph(tiny_export, kvasir_images):
    """Every BinaryConv / BinaryLinear output of the exported graph, run by ORT, equals the
    XNOR-popcount oracle on that node's input, times the scale plus the bias, exactly."""
    model = onnx.load(str(tiny_export.files["refiner_step"]))
    test, nodes = _with_intermediate_outputs(model)
    assert any(n.op_type == "BinaryConv" for n in nodes)
    assert any(n.op_type == "BinaryLinear" for n in nodes)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    session = ort_session(test.SerializeToString())
    names, seg_out = _segment(tiny_export, kvasir_images)
    feed = _refiner_feed(names, seg_out, kvasir_images, [10, 4])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    for node in nodes:
        x, y = outs[node.input[0]], outs[node.output[0]]
        w, scale, bias = (inits[n] for n in node.input[1:])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "BinaryConv":
            pads = list(attrs["pads"])
            assert pads[:2] == pads[2:]
            ints = reference.binary_conv2d(
                x, w, stride=tuple(attrs["strides"]), padding=tuple(pads[:2]),
                dilation=tuple(attrs["dilations"]), pad_value=attrs["pad_value"])
            expected = ints * scale[:, None, None] + bias[:, None, None]
        else:
            expected = reference.binary_linear(x, w) * scale + bias
        assert expected.dtype == np.float32
        np.testing.assert_array_equal(y, expected, err_msg=node.name)


def test_reference_evaluator_matches_ort(tiny_export, kvasir_images):
    names, seg_out = _segment(tiny_export, kvasir_images)
    seg = onnx.load(str(tiny_export.files["segmentor"]))
    ref_out = ReferenceEvaluator(seg).run(None, {"image": kvasir_images})
    for name, a, b in zip(names, seg_out, ref_out, strict=True):
        scale = 1.0 if name == "prior" else float(np.abs(b).max())
        assert np.abs(a - b).max() <= REF_EVAL_ATOL * scale, name
    for role in ("refiner_step", "refiner_step_fp"):
        model = onnx.load(str(tiny_export.files[role]))
        feed = _refiner_feed(names, seg_out, kvasir_images, [8, 2])
        got = ort_session(tiny_export.files[role]).run(None, feed)[0]
        expected = ReferenceEvaluator(model).run(None, feed)[0]
        diff = float(np.abs(got - expected).max())
        print(f"{role} ORT vs onnx.reference max|diff|: {diff:.3g}")
        assert diff <= REF_EVAL_ATOL
