"""The head's shifted sum run natively (``edge_runtime.shifted``) against onnxruntime.

The ``Pad -> Slice x K -> Sum`` group that ``narrow_conv`` writes is folded into one native
pass, and its result equals onnxruntime's run of the same nodes bit for bit (kernels 3 x 3 and
1 x 5 and 3 x 5, any zero padding, with and without a bias, maps with exact zeros, negative
zeros and mixed magnitudes); groups it does not cover stay as they are; the packed executor of
the exported tiny refiner (16 channels wide) folds its head and stays bit-exact, and so it does
when the probe refuses or the taps conv before it is left to onnxruntime (the group back in
onnxruntime).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from refiner_feeds import boundary_values, step_inputs

from edge_runtime import _packed, pointwise, shifted
from edge_runtime import executor as executor_module
from edge_runtime.executor import StepExecutor
from edge_runtime.graph import split_refiner
from edge_runtime.ortutil import make_session
from edge_runtime.rewrite import rewrite_refiner


def _narrow(rng, cout, kh, kw, pads, bias):
    """A k x k conv to ``cout`` channels as rewritten by narrow_conv: (nodes, consts)."""
    cin = cout * kh * kw + 1
    inits = {"w": rng.standard_normal((cout, cin, kh, kw)).astype(np.float32)}
    if bias:
        inits["b"] = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["out"],
                            kernel_shape=[kh, kw], pads=list(pads))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None,
                                                                             None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rewritten, stats = rewrite_refiner(model)
    assert stats.counts()["narrow_conv"] == 1
    nodes = list(rewritten.graph.node)
    consts = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    return nodes, consts


def _taps(rng, n, taps, h, w) -> np.ndarray:
    """An NCHW map of taps with exact zeros, negative zeros and large magnitudes."""
    x = rng.standard_normal((n, taps, h, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = 0.0
    x[rng.random(x.shape) < 0.1] = -0.0
    x[rng.random(x.shape) < 0.05] *= np.float32(1e6)
    return x


def _ort_group(nodes, consts, taps_name, out, x):
    names = sorted({n for node in nodes for n in node.input if n in consts})
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(taps_name, TensorProto.FLOAT,
                                                   [None, x.shape[1], None, None])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(consts[k], k) for k in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return make_session(model).run(None, {taps_name: x})[0]


@settings(max_examples=25, deadline=None)
@given(kh=st.sampled_from([1, 3]), kw=st.sampled_from([3, 5]),
       pads=st.tuples(*[st.integers(0, 2)] * 4),
       size=st.tuples(st.integers(4, 11), st.integers(4, 11)), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_folded_sum_equals_onnxruntime(kh, kw, pads, size, bias, seed):
    rng = np.random.default_rng(seed)
    nodes, consts = _narrow(rng, 1, kh, kw, pads, bias)
    group = nodes[1:]  # Pad, Slices, Sum (the taps conv first)
    natives: dict = {}
    folded = shifted.fold(group, consts, natives)
    assert [n.op_type for n in folded] == [shifted.OP]
    native = natives[id(folded[0])]
    assert native.exact
    taps = group[0].input[0]
    x = _taps(rng, 2, kh * kw, *size)
    if size[0] + pads[0] + pads[2] < kh or size[1] + pads[1] + pads[3] < kw:
        return  # an empty output: onnxruntime rejects it, as it does the unfolded conv
    want = _ort_group(group, consts, taps, "out", x).transpose(0, 2, 3, 1)
    got = native(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32))
    # the first channels of a wider map (the 1 x 1 conv's output padded to whole vectors),
    # read in place
    wide = np.concatenate([x, _taps(rng, 2, 7, *size)], axis=1).transpose(0, 2, 3, 1)
    view = np.ascontiguousarray(wide)[..., :kh * kw]
    assert not view.flags.c_contiguous
    assert np.array_equal(native(view).view(np.uint32), got.view(np.uint32))
    # the NumPy form (for shapes the native call does not take) computes the same bits
    fallback = native._numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert np.array_equal(fallback.view(np.uint32), got.view(np.uint32))


def test_groups_it_does_not_cover_stay():
    rng = np.random.default_rng(1)
    nodes, consts = _narrow(rng, 2, 3, 3, (1, 1, 1, 1), True)  # two channels share the Pad
    natives: dict = {}
    assert shifted.fold(nodes, consts, natives) == nodes and not natives
    nodes, consts = _narrow(rng, 1, 3, 3, (1, 1, 1, 1), True)
    pad = nodes[1]
    consts[pad.input[1]] = consts[pad.input[1]].copy()
    consts[pad.input[1]][1] = 1  # padding the channel axis too
    assert shifted.fold(nodes, consts, natives) == nodes and not natives


def test_native_call_rejects_bad_arguments():
    x = np.zeros((1, 4, 4, 2), np.float32)
    terms = np.array([[0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="outside x"):
        _packed.shifted_sum(x, np.array([[2, 0, 0]], np.int32), np.zeros(1, np.float32),
                            0, 0, 4, 4)
    with pytest.raises(ValueError, match=r"terms \(K, 3\)"):
        _packed.shifted_sum(x, terms, np.zeros(2, np.float32), 0, 0, 4, 4)
    with pytest.raises(ValueError, match="float32"):
        _packed.shifted_sum(x.astype(np.float64), terms, np.zeros(1, np.float32), 0, 0, 4, 4)


@pytest.mark.parametrize("refused", [None, "shifted", "pointwise"])
def test_executor_folds_the_head_exactly(wide_head_refiner, monkeypatch, refused):
    """Folded; or the probe refuses; or the fold is undone because the taps conv before it
    went back to onnxruntime (the group then stays in the onnxruntime piece around it)."""
    exported, proto = wide_head_refiner
    if refused == "shifted":
        monkeypatch.setattr(shifted.ShiftedSum, "_agrees_with_onnxruntime", lambda self: False)
    if refused == "pointwise":
        monkeypatch.setattr(pointwise.PointwiseConv, "_agrees_with_onnxruntime",
                            lambda self, node, consts: False)
    proto, stats = rewrite_refiner(proto)  # as the runtime runs it
    assert stats.counts()["narrow_conv"] == 1
    split = split_refiner(proto)
    unfolded = []
    monkeypatch.setattr(executor_module, "unfold", lambda nodes, kinds, natives,
                        real=executor_module.unfold: (
        unfolded.append(any(isinstance(v, shifted.ShiftedSum) for v in natives.values()))
        or real(nodes, kinds, natives)))
    executor = StepExecutor(proto, split)
    assert ("numpy:" + shifted.OP in executor.labels) == (refused is None)
    assert unfolded == [refused != "shifted"]  # folded, then kept or undone by the plan
    dynamic = make_session(split.dynamic.model)
    for seed, step in ((0, 10), (8, 3)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])
