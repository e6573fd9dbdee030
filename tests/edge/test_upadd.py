"""The decoders' ``Add(Resize_2x(low), Conv_1x1(skip))`` in one native pass (``upadd``).

The native call with ``add_up`` equals the upsampled map plus the convolution bit for bit on
every kernel path (widths that fill whole vectors and ones that do not, odd batch, zeros), and
the sign words it also writes for the next binary conv equal that conv's own packing; the
fold replaces the three nodes, in either operand order of the Add, and its result equals
onnxruntime's run of them; groups it does not cover stay; the packed executor of the exported
tiny refiner folds its decoders and stays bit-exact, and so it does with every 1 x 1 probe
refusing (nothing folded).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from refiner_feeds import boundary_values, step_inputs

from edge_runtime import _packed, pointwise, upadd
from edge_runtime.executor import StepExecutor
from edge_runtime.graph import split_refiner
from edge_runtime.ortutil import make_session
from edge_runtime.rewrite import rewrite_refiner


def _values(rng, shape):
    v = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)
    v[rng.random(shape) < 0.15] = 0.0
    return v


@pytest.mark.parametrize(("cin", "cout"), [(32, 32), (16, 48), (32, 24), (8, 9)])
def test_add_up_equals_upsample_plus_conv(cin, cout, kernel_path):
    rng = np.random.default_rng(cin + cout)
    x, w, b = _values(rng, (3, 10, 14, cin)), _values(rng, (cin, cout)), _values(rng, (cout,))
    low = _values(rng, (3, 5, 7, cout))
    want = np.repeat(np.repeat(low, 2, 1), 2, 2) + _packed.pointwise(x, w, b)
    for threads in (1, 2):
        got = _packed.pointwise(x, w, b, threads=threads, add_up=low)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_add_up_with_threads_splitting_mid_row_and_mid_item(kernel_path):
    """Large enough to split over threads: chunks start inside a row and inside the second
    item, where each chunk finds its pixels' addend rows (and words) from its first pixel."""
    rng = np.random.default_rng(3)
    x, w, b = _values(rng, (2, 70, 66, 32)), _values(rng, (32, 32)), _values(rng, (32,))
    low, sub = _values(rng, (2, 35, 33, 32)), _values(rng, (2, 32))
    want = np.repeat(np.repeat(low, 2, 1), 2, 2) + _packed.pointwise(x, w, b)
    from edge_runtime import packed

    want_words = np.concatenate([packed.pack_nhwc(want[i:i + 1], sub=sub[i]) for i in range(2)])
    for threads in (2, 3, 5):
        got, words = _packed.pointwise(x, w, b, threads=threads, add_up=low, pack_sub=sub)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), threads
        assert np.array_equal(words.view(np.uint32), want_words.view(np.uint32)), threads


@pytest.mark.parametrize("cout", [32, 48, 64, 96, 24, 9])
def test_packed_words_of_the_result(cout, kernel_path):
    """``pack_sub``: the sign words of ``result - sub`` as the binary convs pack them (whole
    words per block of channels; a given ``words`` array's old contents do not leak in)."""
    from edge_runtime import packed

    rng = np.random.default_rng(cout)
    x, w, b = _values(rng, (2, 6, 8, 16)), _values(rng, (16, cout)), _values(rng, (cout,))
    low, sub = _values(rng, (2, 3, 4, cout)), _values(rng, (2, cout))
    stale = np.full((2, 6, 8, (cout + 31) // 32), -1, np.int32)
    for kwargs in ({"add_up": low, "pack_sub": sub}, {"pack_sub": sub[0], "words": stale}):
        y, words = _packed.pointwise(x, w, b, threads=2, **kwargs)
        subs = sub if kwargs["pack_sub"].ndim == 2 else np.stack([sub[0], sub[0]])
        want = np.concatenate([packed.pack_nhwc(y[i:i + 1], sub=subs[i]) for i in range(2)])
        assert np.array_equal(words.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match="words needs pack_sub"):
        _packed.pointwise(x, w, b, words=stale)


def test_empty_map_with_add_up_and_words():
    x, w = np.zeros((1, 0, 4, 32), np.float32), np.ones((32, 32), np.float32)
    y, words = _packed.pointwise(x, w, add_up=np.zeros((1, 0, 2, 32), np.float32),
                                 pack_sub=np.zeros(32, np.float32))
    assert y.shape == (1, 0, 4, 32) and words.shape == (1, 0, 4, 1)


def test_add_up_bad_arguments():
    x, w = np.zeros((1, 4, 6, 8), np.float32), np.zeros((8, 16), np.float32)
    with pytest.raises(ValueError, match="add_up must be NHWC"):
        _packed.pointwise(x, w, add_up=np.zeros((1, 4, 6, 16), np.float32))
    with pytest.raises(ValueError, match="even H and W"):
        _packed.pointwise(np.zeros((1, 3, 6, 8), np.float32), w,
                          add_up=np.zeros((1, 1, 3, 16), np.float32))
    shared = np.zeros(384, np.float32)  # out and add_up in one buffer
    with pytest.raises(ValueError, match="overlap add_up"):
        _packed.pointwise(x, w, None, shared.reshape(1, 4, 6, 16),
                          add_up=shared[:96].reshape(1, 2, 3, 16))


def _group(rng, cout: int, resize_first: bool, extra_reader: bool = False):
    """Conv 1 x 1 (skip) + Resize 2x (low) + Add as a model; (model, consts, nodes)."""
    cin = 32
    consts = {"w": _values(rng, (cout, cin, 1, 1)), "b": _values(rng, (cout,)),
              "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [helper.make_node("Conv", ["skip", "w", "b"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Resize", ["low", "", "scales"], ["u"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Add", ["u", "c"] if resize_first else ["c", "u"], ["out"])]
    outputs = ["out"] + (["u"] if extra_reader else [])
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["u"], ["r"]))
        outputs = ["out", "r"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("skip", TensorProto.FLOAT, [None, cin, None,
                                                                                None]),
                     helper.make_tensor_value_info("low", TensorProto.FLOAT, [None, cout, None,
                                                                               None])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, consts, nodes


@pytest.mark.parametrize("resize_first", [True, False])
def test_fold_equals_onnxruntime(resize_first):
    rng = np.random.default_rng(4)
    model, consts, nodes = _group(rng, 32, resize_first)
    natives: dict = {}
    folded = upadd.fold(nodes, consts, natives)
    if pointwise.PointwiseConv.build(nodes[0], consts) is None:  # no vector path / refused
        assert folded == nodes and not natives
        return
    assert [n.op_type for n in folded] == [upadd.OP]
    native = natives[id(folded[0])]
    skip, low = _values(rng, (2, 32, 12, 10)), _values(rng, (2, 32, 6, 5))
    want = make_session(model).run(None, {"skip": skip, "low": low})[0].transpose(0, 2, 3, 1)
    got = native(skip.transpose(0, 2, 3, 1), low.transpose(0, 2, 3, 1))
    assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32))
    with pytest.raises(ValueError, match="add_up must be NHWC"):  # as the graph's Add would
        native(skip[:, :, :11].transpose(0, 2, 3, 1), low.transpose(0, 2, 3, 1)[:, :5])


def test_groups_it_does_not_cover_stay():
    rng = np.random.default_rng(5)
    for cout, extra in ((32, True), (9, False)):  # the upsampled map read elsewhere; padded
        _, consts, nodes = _group(rng, cout, True, extra_reader=extra)
        natives: dict = {}
        assert upadd.fold(nodes, consts, natives) == nodes and not natives


@pytest.mark.parametrize("probe", [True, False])
def test_executor_folds_the_decoders_exactly(refiner, monkeypatch, probe):
    exported, proto = refiner
    if not probe:
        monkeypatch.setattr(pointwise.PointwiseConv, "_agrees_with_onnxruntime",
                            lambda self, node, consts: False)
    proto, stats = rewrite_refiner(proto)
    assert stats.counts()["conv_before_upsample"] >= 1
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    folded = [label for label in executor.labels if label == "numpy:" + upadd.OP]
    assert bool(folded) == (probe and _packed.current_path() in ("avx512", "avx2"))
    dynamic = make_session(split.dynamic.model)
    for seed, step in ((0, 10), (8, 3)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])
