"""Native 1 x 1 convolutions of the packed region (``edge_runtime.pointwise``) against ORT.

Where a node is accepted, its NHWC result equals onnxruntime's convolution bit for bit (several
channel counts, some padded to whole vectors, with and without a bias, odd sizes, values of
mixed magnitudes and zeros; a node onnxruntime computes another way, such as 8 input channels,
is refused by the probe); the nodes it cannot express are refused; the packed executor of the
exported tiny refiner runs its 1 x 1 convolutions natively and stays bit-exact, and so it does
when every probe refuses (all of them back in onnxruntime).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from refiner_feeds import boundary_values, step_inputs

from edge_runtime import _packed, pointwise
from edge_runtime.executor import StepExecutor
from edge_runtime.graph import split_refiner
from edge_runtime.ortutil import make_session
from edge_runtime.rewrite import rewrite_refiner


def _conv(rng, cin, cout, bias=True, **attrs):
    consts = {"w": rng.standard_normal((cout, cin, *attrs.pop("kernel", (1, 1)))).astype(
        np.float32)}
    inputs = ["x", "w"]
    if bias:
        consts["b"] = rng.standard_normal(cout).astype(np.float32)
        inputs.append("b")
    kernel = list(consts["w"].shape[2:])
    return helper.make_node("Conv", inputs, ["y"], kernel_shape=kernel, **attrs), consts


def _ort(node, consts, x_nchw):
    inits = [helper.make_tensor(k, TensorProto.FLOAT, v.shape, v.ravel().tolist())
             for k, v in consts.items()]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, x_nchw.shape[1], None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return make_session(model).run(None, {"x": x_nchw})[0].transpose(0, 2, 3, 1)


def _vector_path():
    return _packed.current_path() in ("avx512", "avx2")


@pytest.mark.parametrize(("cin", "cout", "bias"), [
    (32, 32, True), (32, 32, False), (32, 64, True), (64, 128, True), (128, 64, False),
    (16, 16, True), (24, 48, True), (16, 9, True), (32, 9, False), (8, 3, True)])
def test_pointwise_equals_onnxruntime(cin, cout, bias, kernel_path):
    rng = np.random.default_rng(cin * cout)
    node, consts = _conv(rng, cin, cout, bias)
    conv = pointwise.PointwiseConv.build(node, consts)
    if not _vector_path():
        assert conv is None  # no vector path: left to onnxruntime
        return
    if conv is None:  # the probe refused: measured to accept ORT's blocked kernel (input
        # channels in blocks of 16) on AVX-512 x86; elsewhere the probe decides
        assert cin % 16 or "avx512" not in _packed.available_paths()
        return
    for shape in ((1, cin, 33, 40), (3, cin, 5, 7), (1, cin, 1, 1)):
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 5, shape)).astype(np.float32)
        x[0, :, 0, 0] = 0.0
        want = np.ascontiguousarray(_ort(node, consts, x))
        got = conv(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_nodes_it_cannot_express_are_refused():
    rng = np.random.default_rng(3)
    for attrs in ({"kernel": (3, 3)}, {"strides": [2, 2]}, {"pads": [1, 1, 1, 1]},
                  {"group": 2}, {"dilations": [2, 2]}):
        node, consts = _conv(rng, 32, 32, **attrs)
        if attrs.get("group") == 2:
            consts["w"] = consts["w"][:, :16].copy()
        assert pointwise.PointwiseConv.build(node, consts) is None
    node, consts = _conv(rng, 32, 32)
    assert pointwise.PointwiseConv.build(node, {"b": consts["b"]}) is None  # weights unknown


def test_pointwise_bad_arguments():
    x = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"w \(Cin, Cout\)"):
        _packed.pointwise(x, np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"bias \(Cout,\)"):
        _packed.pointwise(x, np.zeros((4, 8), np.float32), np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="float32"):
        _packed.pointwise(x.astype(np.float64), np.zeros((4, 8), np.float32))
    square = np.zeros((1, 2, 2, 8), np.float32)
    with pytest.raises(ValueError, match="must not overlap x"):  # rows are read after writes
        _packed.pointwise(square, np.zeros((8, 8), np.float32), None, square)


@pytest.mark.parametrize("probe", [True, False])
def test_executor_runs_pointwise_convs_natively_and_exactly(refiner, monkeypatch, probe,
                                                           kernel_path):
    exported, proto = refiner
    if not probe:
        monkeypatch.setattr(pointwise.PointwiseConv, "_agrees_with_onnxruntime",
                            lambda self, node, consts: False)
    proto, _ = rewrite_refiner(proto)  # as the runtime runs it
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    native = [label for label in executor.labels if label == "numpy:Conv"]
    assert bool(native) == (probe and _vector_path())
    dynamic = make_session(split.dynamic.model)
    for seed, step in ((0, 10), (8, 3)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])
