"""edge_runtime.rewrite: each rewrite fires where it should, not where it should not, and the
rewritten graph computes what the original does (onnxruntime on both).

Tolerance: the rewrites regroup float32 sums (a conv's sum split over taps or over concat
inputs; a BN scale moved into the conv weights), so results differ by a few roundings of the
partial sums: REL = 1e-5 of the output's scale. Inputs and weights include exact zeros.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.graph import split_refiner
from edge_runtime.model import load_model
from edge_runtime.ortutil import make_session
from edge_runtime.rewrite import REWRITES, rewrite_refiner

REL = 1e-5  # regrouped float32 sums (module docstring)


def _model(nodes, inputs: dict[str, list], inits: dict[str, np.ndarray], output: str = "out"):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                     for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _values(rng, shape, zeros: float = 0.2) -> np.ndarray:
    """Normal values with a fraction set to exact zero."""
    v = rng.standard_normal(shape).astype(np.float32)
    v[rng.random(shape) < zeros] = 0.0
    return v


def _check(model, feeds: dict[str, np.ndarray], fired: dict[str, int]):
    rewritten, stats = rewrite_refiner(model)
    assert stats.counts() == {name: fired.get(name, 0) for name in REWRITES}
    want = make_session(model).run(None, feeds)[0]
    got = make_session(rewritten).run(None, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=REL * max(1.0, np.abs(want).max()))
    return rewritten


@settings(max_examples=25, deadline=None)
@given(cout=st.sampled_from([1, 2]), kh=st.sampled_from([1, 3]), kw=st.sampled_from([3, 5]),
       pads=st.tuples(*[st.integers(0, 2)] * 4), size=st.tuples(st.integers(5, 9),
                                                                 st.integers(5, 9)),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_narrow_conv(cout, kh, kw, pads, size, bias, seed):
    rng = np.random.default_rng(seed)
    cin = cout * kh * kw + 1
    w = _values(rng, (cout, cin, kh, kw))
    inits = {"w": w} | ({"b": _values(rng, (cout,))} if bias else {})
    node = helper.make_node("Conv", ["y_t", "w"] + (["b"] if bias else []), ["out"],
                            kernel_shape=[kh, kw], pads=list(pads))
    x = _values(rng, (2, cin, *size))
    _check(_model([node], {"y_t": [2, cin, *size]}, inits), {"y_t": x}, {"narrow_conv": 1})


def test_narrow_conv_leaves_wide_strided_and_grouped_convs():
    rng = np.random.default_rng(0)
    x = _values(rng, (1, 8, 6, 6))
    cases = [((4, 8, 3, 3), {}),  # 4 * 9 > 8 output taps: im2col is worth it
             ((1, 8, 3, 3), {"strides": [2, 2]}),
             ((2, 4, 3, 3), {"group": 2}),
             ((1, 8, 3, 3), {"dilations": [2, 2]})]
    for shape, attrs in cases:
        node = helper.make_node("Conv", ["y_t", "w"], ["out"], pads=[1, 1, 1, 1], **attrs)
        _check(_model([node], {"y_t": [1, 8, 6, 6]}, {"w": _values(rng, shape)}), {"y_t": x}, {})


def _upsample_fuse(order: str, *, mode: str = "nearest", coords: str = "asymmetric",
                   extra_reader: bool = False, bias: bool = True):
    rng = np.random.default_rng(1)
    inits = {"w": _values(rng, (5, 7, 1, 1)), "scales": np.array([1, 1, 2, 2], np.float32)}
    if bias:
        inits["b"] = _values(rng, (5,))
    low, skip = ("y_t", "image")
    nodes = [helper.make_node("Resize", [low, "", "scales"], ["up"], mode=mode,
                              coordinate_transformation_mode=coords, nearest_mode="floor")]
    parts = ["up", skip] if order == "up_first" else [skip, "up"]
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    nodes.append(helper.make_node("Conv", ["cat", "w"] + (["b"] if bias else []), ["conv"]))
    out = "conv"
    if extra_reader:  # the concatenated map is also read elsewhere: it must stay
        nodes.append(helper.make_node("ReduceSum", ["cat"], ["s"], keepdims=1))
        nodes.append(helper.make_node("Add", ["conv", "s"], ["sum"]))
        out = "sum"
    nodes.append(helper.make_node("Identity", [out], ["out"]))
    # channels: 3 low-resolution + 4 skip; widths must be known statically
    widths = {"y_t": [1, 3, 4, 5], "image": [1, 4, 8, 10]}
    if order != "up_first":
        inits["w"] = np.concatenate([inits["w"][:, 3:], inits["w"][:, :3]], axis=1)
    model = _model(nodes, widths, inits)
    feeds = {"y_t": _values(rng, (1, 3, 4, 5)), "image": _values(rng, (1, 4, 8, 10))}
    return model, feeds


@pytest.mark.parametrize("order", ["up_first", "skip_first"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_before_upsample(order, bias):
    model, feeds = _upsample_fuse(order, bias=bias)
    rewritten = _check(model, feeds, {"conv_before_upsample": 1})
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Concat" not in ops and ops.count("Conv") == 2
    resize = next(n for n in rewritten.graph.node if n.op_type == "Resize")
    assert resize.input[0] != "y_t"  # the conv runs before the upsampling


@pytest.mark.parametrize("kw", [{"mode": "linear", "coords": "half_pixel"},
                                {"extra_reader": True}])
def test_conv_before_upsample_needs_nearest_and_a_private_concat(kw):
    model, feeds = _upsample_fuse("up_first", **kw)
    _check(model, feeds, {})


def _stem(*, static_other: bool = True, residual: bool = False, conv_h: bool = True):
    """y_t -> Conv 3x3 (1 -> C) + s -> BN [-> Conv 1x1 (C -> C) + f -> BN] (the refiner's stem
    and its first feature injection); ``residual``: the stem's output is also added later.
    C = 12 > 9 taps: the composed 3x3 conv of y_t is cheaper than the 1 x 1 conv it replaces."""
    c = 12
    rng = np.random.default_rng(2)
    inits = {"wy": _values(rng, (c, 1, 3, 3)), "wh": _values(rng, (c, c, 1, 1)),
             "bh": _values(rng, (c,))}
    for k in ("0", "1"):
        inits |= {f"g{k}": rng.uniform(0.5, 2, c).astype(np.float32),
                  f"be{k}": _values(rng, (c,)), f"m{k}": _values(rng, (c,)),
                  f"v{k}": rng.uniform(0.5, 2, c).astype(np.float32)}
    other = "image" if static_other else "dyn"
    nodes = [helper.make_node("Conv", ["y_t", "wy"], ["cy"], pads=[1, 1, 1, 1])]
    if not static_other:
        nodes.append(helper.make_node("Mul", ["y_t", "image"], ["dyn"]))  # depends on y_t
    nodes += [helper.make_node("Add", ["cy", other], ["a0"]),
              helper.make_node("BatchNormalization", ["a0", "g0", "be0", "m0", "v0"], ["h0"])]
    last = "h0"
    if conv_h:
        nodes += [helper.make_node("Conv", ["h0", "wh", "bh"], ["ch"]),
                  helper.make_node("Add", ["ch", "prior"], ["a1"]),
                  helper.make_node("BatchNormalization", ["a1", "g1", "be1", "m1", "v1"], ["h1"])]
        last = "h1"
    if residual:
        nodes.append(helper.make_node("Add", [last, "h0"], ["res"]))
        last = "res"
    nodes.append(helper.make_node("Identity", [last], ["out"]))
    inputs = {"y_t": [1, 1, 6, 7], "image": [1, c, 6, 7], "prior": [1, c, 6, 7]}
    feeds = {"y_t": (rng.random((1, 1, 6, 7)) < 0.4).astype(np.float32),
             "image": _values(rng, (1, c, 6, 7)), "prior": _values(rng, (1, c, 6, 7))}
    return _model(nodes, inputs, inits), feeds


def test_bn_through_add_and_conv_through_add_fold_the_stem():
    model, feeds = _stem(residual=True)
    rewritten = _check(model, feeds, {"bn_through_add": 2, "conv_through_add": 1,
                                      "sum_statics": 1})
    kinds = split_refiner_kinds(rewritten)
    # per step: the composed 3x3 conv of y_t and adds; no BN and no 1x1 conv of a feature map
    dynamic = [n.op_type for n in rewritten.graph.node if kinds[n.output[0]] == "dynamic"]
    assert "BatchNormalization" not in dynamic
    assert dynamic.count("Conv") == 2  # the stem conv and the composed conv, both of y_t
    assert all(n.input[0] == "y_t" for n in rewritten.graph.node
               if n.op_type == "Conv" and kinds[n.output[0]] == "dynamic")


def test_bn_and_conv_stay_when_the_other_operand_depends_on_y_t():
    model, feeds = _stem(static_other=False, conv_h=False)
    _check(model, feeds, {})


def test_sum_statics_only_when_the_sum_leaves_the_step():
    rng = np.random.default_rng(3)
    feeds = {"y_t": _values(rng, (1, 4, 5, 5)), "image": _values(rng, (1, 4, 5, 5)),
             "prior": _values(rng, (1, 4, 5, 5))}
    nodes = [helper.make_node("Relu", ["y_t"], ["d"]),
             helper.make_node("Add", ["d", "image"], ["a"]),
             helper.make_node("Add", ["prior", "a"], ["out"])]
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    rewritten = _check(_model(nodes, shapes, {}), feeds, {"sum_statics": 1})
    kinds = split_refiner_kinds(rewritten)
    assert [n.op_type for n in rewritten.graph.node if kinds[n.output[0]] == "dynamic"] == [
        "Relu", "Add"]
    # image + step-table would depend on both: it stays in the step
    step_model = _model(nodes[:2] + [helper.make_node("Gather", ["table", "step"], ["t"]),
                                     helper.make_node("Add", ["a", "t"], ["out"])],
                        shapes, {"table": _values(rng, (3, 4, 1, 1))})
    step_model.graph.input.append(helper.make_tensor_value_info("step", TensorProto.INT64, [1]))
    _check(step_model, {**feeds, "step": np.array([1], np.int64)}, {})


def split_refiner_kinds(model) -> dict[str, str]:
    from edge_runtime.graph import classify

    return classify(model.graph)


def test_unknown_rewrite_is_rejected():
    model, _ = _stem()
    with pytest.raises(ValueError, match="narrow_conv"):
        rewrite_refiner(model, rewrites=("fold_everything",))


def _tiny_values(exported) -> dict[str, np.ndarray]:
    """Image, segmentor outputs and a y_t draw for a batch of two (the tiny export)."""
    rng = np.random.default_rng(0)
    h, w = exported.facts.input_size
    x = rng.standard_normal((2, exported.facts.in_channels, h, w)).astype(np.float32)
    seg = make_session(exported.files["segmentor"])
    names = [o.name for o in seg.get_outputs()]
    values = dict(zip(names, seg.run(None, {"image": x}), strict=True), image=x)
    values["y_t"] = (rng.random(values["prior"].shape) < values["prior"]).astype(np.float32)
    return values


def test_tiny_export_rewritten_matches_the_file(tiny_export):
    """The exported tiny refiner: rewrites fire, the rewritten step graph agrees with the file
    (ORT, tolerance REL) and splits like the original (same dynamic inputs)."""
    exported = load_model(tiny_export[1])
    proto = exported.protos["refiner_step"]
    rewritten, stats = rewrite_refiner(proto)
    assert stats.counts()["conv_before_upsample"] > 0 and stats.counts()["bn_through_add"] > 0
    values = _tiny_values(exported)
    for step in (10, 1):
        feeds = dict(values, step=np.full(2, step, np.int64))
        want = make_session(proto).run(None, {i.name: feeds[i.name] for i in proto.graph.input
                                              if i.name in feeds})[0]
        got = make_session(rewritten).run(None, {i.name: feeds[i.name]
                                                 for i in rewritten.graph.input
                                                 if i.name in feeds})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=REL)
    assert split_refiner(rewritten).dynamic.inputs[0] == "y_t"


def _conv_add_bn(rng, *, cout: int, cin: int):
    """BN(Conv 3x3 (y_t, cin -> cout) + image): nodes and initializers."""
    inits = {"w": _values(rng, (cout, cin, 3, 3)), "g": np.ones(cout, np.float32) * 2,
             "be": _values(rng, (cout,)), "m": _values(rng, (cout,)),
             "v": np.ones(cout, np.float32)}
    nodes = [helper.make_node("Conv", ["y_t", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "image"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "g", "be", "m", "v"], ["out"])]
    return nodes, inits


def test_nothing_fires_without_known_channel_counts():
    """BN(Conv(y_t) + image) where ``image`` has one channel spread over four: with shapes
    declared the counts differ, without shapes they are unknown; neither may fire (the
    rewritten BN(image) would have the wrong channel count)."""
    rng = np.random.default_rng(4)
    nodes, inits = _conv_add_bn(rng, cout=4, cin=2)
    feeds = {"y_t": _values(rng, (1, 2, 5, 5)), "image": _values(rng, (1, 1, 5, 5))}
    _check(_model(nodes, {"y_t": [1, 2, 5, 5], "image": [1, 1, 5, 5]}, inits), feeds, {})
    _check(_model(nodes, {"y_t": None, "image": None}, inits), feeds, {})


def test_same_padding_and_resize_by_sizes_are_left_alone():
    rng = np.random.default_rng(5)
    conv = helper.make_node("Conv", ["y_t", "w"], ["out"], auto_pad="SAME_UPPER",
                            kernel_shape=[3, 3])
    x = _values(rng, (1, 8, 6, 6))
    _check(_model([conv], {"y_t": [1, 8, 6, 6]}, {"w": _values(rng, (1, 8, 3, 3))}),
           {"y_t": x}, {})
    model, feeds = _upsample_fuse("up_first")
    resize = model.graph.node[0]
    resize.input[2] = ""  # scales -> sizes (the same 2x upsampling)
    resize.input.append("sizes")
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 3, 8, 10], np.int64),
                                                           "sizes"))
    _check(model, feeds, {})


def test_overlapping_matches_fire_once_and_leave_no_dead_weights():
    """A narrow conv whose output a BN-through-add would also fold: the first match in graph
    order wins, the other is dropped with its new weights, and the weights of removed nodes
    leave the graph."""
    rng = np.random.default_rng(6)
    nodes, inits = _conv_add_bn(rng, cout=1, cin=16)
    feeds = {"y_t": _values(rng, (1, 16, 5, 5)), "image": _values(rng, (1, 1, 5, 5))}
    model = _model(nodes, {k: list(v.shape) for k, v in feeds.items()}, inits)
    rewritten = _check(model, feeds, {"narrow_conv": 1})
    read = {name for node in rewritten.graph.node for name in node.input}
    assert all(init.name in read for init in rewritten.graph.initializer)
    model, feeds = _upsample_fuse("up_first")
    rewritten = _check(model, feeds, {"conv_before_upsample": 1})
    assert "w" not in {init.name for init in rewritten.graph.initializer}


def test_runner_without_rewrites_runs_the_graph_as_exported(tiny_export):
    from edge_runtime.refiner import RefinerRunner

    exported = load_model(tiny_export[1])
    proto = exported.protos["refiner_step"]
    plain = RefinerRunner(proto, backend="onnxruntime", rewrite=False)
    rewritten = RefinerRunner(proto, backend="onnxruntime")
    assert not any(plain.rewrites.counts().values()) and any(rewritten.rewrites.counts().values())
    values = _tiny_values(exported)
    for runner in (plain, rewritten):
        runner.prepared = runner.prepare(values)
    want = make_session(proto).run(None, {**{i.name: values[i.name] for i in proto.graph.input
                                             if i.name in values},
                                          "step": np.full(2, 10, np.int64)})[0]
    for runner in (plain, rewritten):  # the split and the rewrites: float rounding only
        np.testing.assert_allclose(runner(runner.prepared, values["y_t"], 10), want, rtol=0,
                                   atol=REL)
