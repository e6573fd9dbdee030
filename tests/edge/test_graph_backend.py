"""The refiner graph split and the packed backend's executor, on the exported tiny model and on
small hand-made graphs.

- the static / step / dynamic parts reproduce the whole graph (ORT, float rounding only);
- the packed executor reproduces the ORT dynamic part bit for bit, every packed binary conv's
  float output equals the ORT function body's, and its integer part equals
  ``reference.binary_conv2d``;
- consecutive binary convs stay packed; convs the kernel cannot take fall back to ORT;
- the NHWC elementwise kernels equal the NCHW ones bit for bit;
- the NHWC 2 x 2 average pool equals ORT's bit for bit where its probe says ORT rounds in its
  order, and the planner pools in NumPy only there (the executor stays bit-exact either way).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from refiner_feeds import binary_step_model, boundary_values, step_inputs

import reference
from edge_runtime import _packed, nhwc, packed, pool
from edge_runtime.executor import StepExecutor
from edge_runtime.graph import split_refiner
from edge_runtime.ortutil import make_session


def test_split_parts_reproduce_the_graph(refiner):
    exported, proto = refiner
    split = split_refiner(proto)
    kinds = split.kinds
    assert kinds["y_t"] == "dynamic" and kinds["step"] == "step" and kinds["image"] == "static"
    assert split.static.nodes and split.step.nodes and split.dynamic.nodes
    # nothing that depends only on the image or only on the step is left in the per-step part
    for node in split.dynamic.nodes:
        assert any(kinds.get(i) == "dynamic" for i in node.input) or {
            kinds.get(i) for i in node.input} >= {"static", "step"}
    values = step_inputs(exported)
    full = make_session(proto)
    for step in (10, 3, 1):
        feeds = dict(values, step=np.full(2, step, np.int64))
        want = full.run(None, {i.name: feeds[i.name] for i in full.get_inputs()})[0]
        feeds = boundary_values(split, values, step, 2)
        got = make_session(split.dynamic.model).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_packed_executor_is_bit_exact(refiner):
    exported, proto = refiner
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    n_binary = sum(n.op_type == "BinaryConv" for n in proto.graph.node)
    assert executor.stats.packed == n_binary and not executor.stats.fallbacks
    dynamic = make_session(split.dynamic.model)
    for seed, step in ((0, 10), (1, 5), (2, 1)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])


def test_binary_layers_equal_function_bodies(refiner):
    """Every packed conv output == the ORT function body's output for the same node (exact),
    and its integer part == reference.binary_conv2d of the node's input."""
    exported, proto = refiner
    split = split_refiner(proto)
    executor = StepExecutor(proto, split, keep_specs=True)
    feeds = boundary_values(split, step_inputs(exported, 3), 7, 2)
    mine = executor.binary_outputs(feeds)
    specs = {name: spec for name, _, spec in executor.binary_layers(feeds)}
    nodes = [n for n in split.dynamic.nodes if n.op_type == "BinaryConv"]
    assert set(mine) == {n.output[0] for n in nodes}
    probe = onnx.ModelProto()
    probe.CopyFrom(split.dynamic.model)
    wanted = [n.output[0] for n in nodes] + [n.input[0] for n in nodes]
    for name in dict.fromkeys(wanted):
        info = onnx.ValueInfoProto(name=name)
        info.type.CopyFrom(split.types[name])
        probe.graph.output.append(info)
    names = [o.name for o in probe.graph.output]
    theirs = dict(zip(names, make_session(probe).run(names, feeds), strict=True))
    for node in nodes:
        out = node.output[0]
        assert np.array_equal(mine[out], theirs[out]), node.name
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        spec = specs[node.name]
        w, scale, bias = spec["weight"], spec["scale"], spec["bias"]
        top, left, _, _ = attrs["pads"]
        assert spec["padding"] == (top, left) and spec["stride"] == tuple(attrs["strides"])
        ints = reference.binary_conv2d(theirs[node.input[0]], w, stride=tuple(attrs["strides"]),
                                       padding=(top, left), dilation=tuple(attrs["dilations"]),
                                       pad_value=attrs["pad_value"])
        recovered = ints.astype(np.float32) * scale.reshape(1, -1, 1, 1) + bias.reshape(
            1, -1, 1, 1)
        assert np.array_equal(recovered, mine[out]), node.name


def _binary_chain_model(pads2=(1, 1, 1, 1), pad_value2: float = 1.0) -> onnx.ModelProto:
    """y_t (1, 40, 9, 9) -> BinaryConv -> BinaryConv -> Add(step table) -> output."""
    rng = np.random.default_rng(5)
    inits, nodes = [], []
    cin = 40
    for i, (cout, pads, pv) in enumerate(((36, (1, 1, 1, 1), 1.0), (33, pads2, pad_value2))):
        w = np.where(rng.random((cout, cin, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
        inits += [helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel()),
                  helper.make_tensor(f"s{i}", TensorProto.FLOAT, [cout],
                                     rng.random(cout).astype(np.float32) + 0.1),
                  helper.make_tensor(f"b{i}", TensorProto.FLOAT, [cout],
                                     rng.standard_normal(cout).astype(np.float32))]
        src = "y_t" if i == 0 else "h0"
        nodes.append(helper.make_node(
            "BinaryConv", [src, f"w{i}", f"s{i}", f"b{i}"], [f"h{i}"], domain="ai.hidiff",
            kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1], pads=list(pads),
            pad_value=pv, channels_in=cin, channels_out=cout))
        cin = cout
    table = rng.standard_normal((11, 33, 1, 1)).astype(np.float32)
    inits.append(helper.make_tensor("table", TensorProto.FLOAT, table.shape, table.ravel()))
    nodes += [helper.make_node("Gather", ["table", "step"], ["row"]),
              helper.make_node("Add", ["h1", "row"], ["out"])]
    inputs = [helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["N", 40, 9, 9]),
              helper.make_tensor_value_info("step", TensorProto.INT64, ["N"])]
    return binary_step_model(nodes, "chain", inputs, inits)


@pytest.mark.parametrize("pads2, pad_value2, chained, fallback", [
    ((1, 1, 1, 1), 1.0, 1, 0),   # two packed convs, the first one's output stays packed
    ((0, 0, 1, 2), 1.0, 1, 0),   # asymmetric padding with +1: explicit packed padding
    ((0, 0, 1, 2), 0.0, 0, 1),   # asymmetric with 0 padding: left to ORT's function body
])
def test_chained_and_fallback_binary_convs(pads2, pad_value2, chained, fallback):
    model = _binary_chain_model(pads2, pad_value2)
    split = split_refiner(model)
    executor = StepExecutor(model, split)
    assert executor.stats.packed_chained == chained
    assert len(executor.stats.fallbacks) == fallback
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(2, 40, 9, 9)).astype(np.float32)  # zeros: sign(0) = +1
    step = np.array([3, 3], np.int64)
    values = {"y_t": x, "step": step}
    for part in (split.step,):
        out = make_session(part.model).run(part.outputs, {n: values[n] for n in part.inputs})
        values.update(zip(part.outputs, out, strict=True))
    feeds = {n: values[n] for n in split.dynamic.inputs}
    want = make_session(model).run(None, {"y_t": x, "step": step})[0]
    assert np.array_equal(executor.run(feeds), want)


def test_nhwc_kernels_equal_nchw():
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-38, -1e-45], np.float32)
    big = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    big.ravel()[:special.size] = special
    other = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    vec = rng.standard_normal((32, 1, 1)).astype(np.float32)
    slope_in = rng.random((32, 1, 1)).astype(np.float32)
    slope_out = (rng.standard_normal((32, 1, 1)) * 2).astype(np.float32)
    to_nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    back = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    for name, ufunc in (("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply)):
        fn = nhwc.ELEMENTWISE[name]
        for a, b in ((big, vec), (vec, big), (big, other)):
            want = ufunc(a, b)
            got = fn(to_nhwc(a) if a.ndim == 4 else nhwc.view(a),
                     to_nhwc(b) if b.ndim == 4 else nhwc.view(b))
            np.testing.assert_array_equal(back(got), want)
    for slope in (slope_in, slope_out):
        want = np.where(big < 0, big * slope, big)
        got = back(nhwc.prelu(to_nhwc(big), nhwc.view(slope)))
        np.testing.assert_array_equal(got, want)  # (the sign of a zero may differ: harmless)


def test_fused_epilogues_and_their_fallback(refiner, monkeypatch):
    """The TB Sub, residual Add and RPReLU (Add, PRelu, Add) around the packed convs run in the
    kernel's epilogue (which also emits the next conv's packed input), bit-exact; with vectors
    of unexpected shape the fused step falls back to the ops one by one, still bit-exact."""
    from edge_runtime import fused

    exported, proto = refiner
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    stats = executor.stats
    assert stats.fused >= 5 * stats.packed and stats.packed_words > 0
    assert all("+Sub+Add+Add+PRelu+Add" in label for label in executor.labels
               if label.startswith("packed:"))
    dynamic = make_session(split.dynamic.model)
    feeds = boundary_values(split, step_inputs(exported, 4), 6, 2)
    want = dynamic.run(None, feeds)[0]
    assert np.array_equal(executor.run(feeds), want)
    monkeypatch.setattr(fused, "channels_vector", lambda *a: None)
    assert np.array_equal(StepExecutor(proto, split).run(feeds), want)


POOL_CHANNELS = (8, 16, 32, 64, 3)


def _ort_pool(x: np.ndarray) -> np.ndarray:
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
        "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("channels", POOL_CHANNELS)
def test_pool_equals_onnxruntime_where_the_probe_says_so(channels):
    rng = np.random.default_rng(channels)
    x = (rng.standard_normal((2, channels, 13, 10)) * 10.0 ** rng.integers(
        -4, 5, (2, channels, 13, 10))).astype(np.float32)  # odd height: the last row is dropped
    x[0, :, :2, :2] = -0.0
    x[1, 0, :2, :2] = [[np.inf, 1.0], [2.0, 3.0]]
    x[1, -1, 2:4, 2:4] = [[1e8, 1.0], [-1e8, 1.0]]
    want = _ort_pool(x)
    got = pool.average_pool_2x2(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(
        0, 3, 1, 2)
    assert got.shape == want.shape == (2, channels, 6, 5)
    same = np.array_equal(got.view(np.uint32), want.view(np.uint32))
    if pool.matches_onnxruntime(channels):
        assert same
    if channels % 16 == 0 and "avx512" in packed.available_paths():
        # MLAS's blocked (NCHWc) pool, the probe's target: measured to agree on AVX-512 x86;
        # elsewhere accepting is the probe's call (exactness is asserted above either way)
        assert pool.matches_onnxruntime(channels)


@pytest.mark.parametrize("channels", [32, 5])
def test_pool_every_path_computes_the_formula(channels):
    """Each instruction set's pool (the default path's runs) gives ((((0 + a) + b) + d) + e) *
    0.25 in float32, bit for bit (NumPy's float32 ops in that order), over a batch, odd sizes,
    signed zeros and infinities."""
    rng = np.random.default_rng(channels)
    x = (rng.standard_normal((2, 9, 7, channels)) * 1e3).astype(np.float32)
    x[0, :2, :2] = -0.0
    x[1, 0, 0, 0], x[1, 2, 2, 0] = np.inf, -np.inf
    a, b = x[:, 0:8:2, 0:6:2], x[:, 0:8:2, 1:6:2]
    d, e = x[:, 1:8:2, 0:6:2], x[:, 1:8:2, 1:6:2]
    want = ((((np.float32(0) + a) + b) + d) + e) * np.float32(0.25)
    for path in packed.available_paths():
        _packed.set_path(path)
        try:
            got = _packed.avg_pool2(x)
        finally:
            _packed.set_path(None)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), path
    with pytest.raises(ValueError, match="out must not overlap x"):
        _packed.avg_pool2(x, out=x.reshape(-1)[:24 * channels].reshape(2, 4, 3, channels))


def test_pool_threads_split_rows():
    """Two threads over three items (the split falls inside the second item) and three threads
    over one tall item give the one-thread bits."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 67, 70, 32)).astype(np.float32)  # 99 output rows: 50 + 49
    one = _packed.avg_pool2(x)
    assert np.array_equal(pool.average_pool_2x2(x, threads=2).view(np.uint32), one.view(np.uint32))
    tall = rng.standard_normal((1, 200, 70, 32)).astype(np.float32)  # 100 rows: 3 chunks
    assert np.array_equal(_packed.avg_pool2(tall, threads=3).view(np.uint32),
                          _packed.avg_pool2(tall).view(np.uint32))
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        _packed.avg_pool2(x, threads=0)


def test_supported_attributes():
    def node(**attrs):
        return helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    assert pool.supported(node(kernel_shape=[2, 2], strides=[2, 2]))
    assert pool.supported(node(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0]))
    for bad in ({"kernel_shape": [3, 3], "strides": [2, 2]}, {"kernel_shape": [2, 2]},
                {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]},
                {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}):
        assert not pool.supported(node(**bad))
    assert not pool.supported(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2],
                                               strides=[2, 2]))


@pytest.mark.parametrize("probe", [True, False])
def test_executor_pools_in_numpy_only_where_onnxruntime_agrees(refiner, monkeypatch, probe):
    exported, proto = refiner
    if not probe:
        monkeypatch.setattr(pool, "matches_onnxruntime", lambda channels: False)
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    pools = [n for n in split.dynamic.nodes if n.op_type == "AveragePool"]
    assert pools, "the tiny refiner's down blocks pool their shortcut"
    in_numpy = executor.labels.count("numpy:AveragePool")
    if probe:
        channels = _pool_channels(split, pools)
        assert in_numpy == sum(pool.matches_onnxruntime(c) for c in channels)
        if "avx512" in packed.available_paths():  # where the probe was measured to accept
            assert in_numpy >= sum(c % 16 == 0 for c in channels) > 0  # the path is exercised
    else:
        assert in_numpy == 0
    dynamic = make_session(split.dynamic.model)
    for seed, step in ((0, 10), (1, 3)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])


def _pool_channels(split, pools) -> list[int]:
    return [split.types[n.input[0]].tensor_type.shape.dim[1].dim_value for n in pools]


def test_a_pool_of_unknown_channel_count_stays_in_onnxruntime():
    """No probe can run without the channel count (it used to try 0 channels and fail)."""
    from edge_runtime.plan import assign

    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    types = {name: helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", "C", 8, 8])
             for name in ("x", "y")}
    kinds = assign([node], {}, types, use_packed=True, fallbacks=[])
    assert kinds[id(node)] == "ort"
