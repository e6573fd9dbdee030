"""Convolutions of the 0/1 state ``y_t`` through a table (``edge_runtime.lut``) against ORT.

The table rows are the node's own onnxruntime output per tap pattern, so on exact 0/1 maps the
lookup equals ORT's convolution bit for bit (checked on maps of several sizes, kernels and pads,
with and without a bias, alone and followed by a chain of elementwise ops in the same pass); a
map that is not 0/1 goes through ORT; nodes the table cannot express are refused. A hand-made step
shaped like the cpu presets' stem (conv of y_t, + a static image conv, * a step row, - tb,
BinaryConv, + skip) runs its convolution as a lookup in one pass with the elementwise ops after
it, bit-exact against onnxruntime's dynamic part for 0/1 and other states, and when the probe
refuses the table; the exported tiny refiner's step stays bit-exact for any ``y_t``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from refiner_feeds import binary_step_model, boundary_values, step_inputs

from edge_runtime import _packed, lut
from edge_runtime.executor import StepExecutor
from edge_runtime.graph import DYNAMIC_INPUT, split_refiner
from edge_runtime.ortutil import make_session
from edge_runtime.rewrite import rewrite_refiner


def _conv(rng, cout=16, kernel=(3, 3), pads=(1, 1), bias=True, **attrs):
    w = rng.standard_normal((cout, 1, *kernel)).astype(np.float32)
    consts = {"w": w}
    inputs = [DYNAMIC_INPUT, "w"]
    if bias:
        consts["b"] = rng.standard_normal(cout).astype(np.float32)
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], kernel_shape=list(kernel),
                            pads=[*pads, *pads], **attrs)
    return node, consts


def _ort(node, consts, y):
    inits = [helper.make_tensor(k, TensorProto.FLOAT, v.shape, v.ravel().tolist())
             for k, v in consts.items()]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        DYNAMIC_INPUT, TensorProto.FLOAT, [None, 1, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return make_session(model).run(None, {DYNAMIC_INPUT: y})[0].transpose(0, 2, 3, 1)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize(("kernel", "pads", "bias", "cout"), [
    ((3, 3), (1, 1), True, 32), ((3, 3), (1, 1), False, 16), ((3, 3), (0, 0), True, 8),
    ((1, 1), (0, 0), True, 5), ((3, 1), (1, 0), True, 16), ((2, 2), (1, 1), True, 32)])
def test_lookup_equals_onnxruntime_on_0_1_maps(kernel, pads, bias, cout):
    rng = np.random.default_rng(cout + kernel[0])
    node, consts = _conv(rng, cout, kernel, pads, bias)
    table = lut.LutConv.build(node, consts)
    if table is None:  # measured to agree on AVX-512 x86; elsewhere the probe decides
        assert "avx512" not in _packed.available_paths()
        return
    for shape in ((1, 1, 64, 64), (3, 1, 7, 130), (2, 1, 3, 3), (1, 1, 1, 5)):
        if shape[2] + 2 * pads[0] < kernel[0] or shape[3] + 2 * pads[1] < kernel[1]:
            continue
        for y in ((rng.random(shape) < 0.5).astype(np.float32), np.zeros(shape, np.float32),
                  np.ones(shape, np.float32)):
            want = _ort(node, consts, y)
            got = table(y)
            assert got.shape == want.shape == table.output_shape(y.shape)
            assert np.array_equal(_bits(got), _bits(want))
    # not 0/1 (a half, a negative zero): ORT convolves it
    y = (rng.random((2, 1, 9, 11)) < 0.5).astype(np.float32)
    for odd in (0.5, -0.0):
        y[1, 0, 4, 4] = odd
        assert table.chain(y) is None
        assert np.array_equal(_bits(table(y)), _bits(_ort(node, consts, y)))


def test_lookup_with_a_chain_in_the_same_pass():
    rng = np.random.default_rng(7)
    node, consts = _conv(rng, 32)
    table = lut.LutConv.build(node, consts)
    y = (rng.random((3, 1, 20, 24)) < 0.4).astype(np.float32)
    item = rng.standard_normal((1, 20, 24, 32)).astype(np.float32)
    scale = rng.standard_normal((3, 32)).astype(np.float32)
    full = rng.standard_normal((3, 20, 24, 32)).astype(np.float32)
    want = ((_ort(node, consts, y) + item) * scale[:, None, None, :]) - full
    for path in _packed.available_paths():  # each instruction set's variant
        _packed.set_path(path)
        try:
            buf = full.copy()
            got = table.chain(y, b"ams", (item, scale, buf), buf)  # into a full operand's buffer
        finally:
            _packed.set_path(None)
        assert got is buf and np.array_equal(_bits(got), _bits(want))


def test_nodes_the_table_cannot_express_are_refused():
    rng = np.random.default_rng(1)
    node, consts = _conv(rng)
    for bad in (_conv(rng, strides=[2, 2])[0], _conv(rng, dilations=[2, 2], pads=(2, 2))[0],
                _conv(rng, kernel=(4, 4), pads=(1, 1))[0],
                helper.make_node("Conv", ["other", "w", "b"], ["y"], kernel_shape=[3, 3])):
        assert lut.LutConv.build(bad, consts if bad.input[0] == "other" else
                                 {**consts, "w": rng.standard_normal(
                                     (16, 1, *[a.ints for a in bad.attribute
                                               if a.name == "kernel_shape"][0])).astype(
                                     np.float32)}) is None
    two = {"w": rng.standard_normal((16, 2, 3, 3)).astype(np.float32), "b": consts["b"]}
    assert lut.LutConv.build(node, two) is None  # two input channels
    assert lut.LutConv.build(node, {"b": consts["b"]}) is None  # weights not constant


def test_table_arguments_are_checked():
    y = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"table \(512, C\)"):
        _packed.ew_chain(y, b"", (), None, np.zeros((511, 4), np.float32), (3, 3, 1, 1))
    with pytest.raises(ValueError, match="0 <= pad < kernel size"):
        _packed.ew_chain(y, b"", (), None, np.zeros((512, 4), np.float32), (3, 3, 3, 1))
    with pytest.raises(ValueError, match=r"kernel must be \(kh, kw, pad_h, pad_w\)"):
        _packed.ew_chain(y, b"", (), None, np.zeros((512, 4), np.float32), None)
    with pytest.raises(ValueError, match="1 to 16 ops"):
        _packed.ew_chain(y, b"", ())


@pytest.mark.parametrize("c", [32, 20])  # 16-lane registers, and the chunked variant
def test_second_lookup_in_the_same_pass(c):
    """``sub``: a second lookup of the same y_t and its own ops, the operand of the main chain's
    None operands, equals the two chains run apart (bit for bit, every instruction set, with
    the packed words and two threads)."""
    rng = np.random.default_rng(8)
    (n1, k1), (n2, k2) = _conv(rng, c), _conv(rng, c, bias=False)
    first, second = lut.LutConv.build(n1, k1), lut.LutConv.build(n2, k2)
    y = (rng.random((2, 1, 19, 23)) < 0.5).astype(np.float32)
    y[0, 0, :4] = 0.0  # rows of zeros: a +0 table row
    full = rng.standard_normal((2, 19, 23, c)).astype(np.float32)
    item = rng.standard_normal((1, 19, 23, c)).astype(np.float32)
    scale = rng.standard_normal((2, c)).astype(np.float32)
    sub_ops, sub_operands = b"asm", (full, np.float32(-0.0), scale)
    alone = first.chain(y, sub_ops, sub_operands)
    want = second.chain(y, b"ara", (item, alone, scale))  # the sub value second: item - v
    psub = rng.standard_normal(c).astype(np.float32)
    expect = np.zeros((2, 19, 23, (c + 31) // 32), np.uint32)  # sign bits of want - psub
    for ch in range(c):
        expect[..., ch // 32] |= ((want[..., ch] - psub[ch]) < 0).astype(np.uint32) << (ch % 32)
    for path in _packed.available_paths():
        _packed.set_path(path)
        try:
            words = np.empty(expect.shape, np.int32)
            got = second.chain(y, b"ara", (item, None, scale), threads=2,
                               sub=(first, sub_ops, sub_operands), pack_sub=psub, words=words)
        finally:
            _packed.set_path(None)
        assert np.array_equal(_bits(got), _bits(want))
        assert np.array_equal(words.view(np.uint32), expect)


def test_sub_arguments_are_checked():
    rng = np.random.default_rng(9)
    (n1, k1), (n2, k2) = _conv(rng, 16), _conv(rng, 16, kernel=(1, 1), pads=(0, 0))
    first, other = lut.LutConv.build(n1, k1), lut.LutConv.build(n2, k2)
    y = np.zeros((1, 1, 5, 5), np.float32)
    y3, table, geometry = y[:, 0], first.table, (3, 3, 1, 1)
    with pytest.raises(ValueError, match="same kernel, padding and channels"):
        first.chain(y, b"a", (None,), sub=(other, b"", ()))
    with pytest.raises(ValueError, match="sub takes a table start"):
        _packed.ew_chain(np.zeros((1, 5, 5, 16), np.float32), b"a", (None,),
                         sub=(table, b"", ()))
    with pytest.raises(ValueError, match="no operand is None"):
        _packed.ew_chain(y3, b"m", (np.float32(2),), None, table, geometry, sub=(table, b"", ()))
    with pytest.raises(ValueError, match="the table's shape"):
        _packed.ew_chain(y3, b"a", (None,), None, table, geometry,
                         sub=(table[:256].copy(), b"", ()))
    with pytest.raises(ValueError, match=r"sub must be \(table, ops bytes, operands tuple\)"):
        _packed.ew_chain(y3, b"a", (None,), None, table, geometry, sub=(table, "a", ()))
    with pytest.raises(ValueError, match="sub has 1 ops and 0 operands: .* one operand per op"):
        _packed.ew_chain(y3, b"a", (None,), None, table, geometry, sub=(table, b"a", ()))
    # operands are named by their place in their own chain; None only stands for sub's value
    with pytest.raises(ValueError, match="sub operand 1 has 7 values"):
        _packed.ew_chain(y3, b"a", (None,), None, table, geometry,
                         sub=(table, b"aa", (np.float32(1), np.zeros(7, np.float32))))
    with pytest.raises(ValueError, match="sub operand 0 is None: only the main chain's"):
        _packed.ew_chain(y3, b"a", (None,), None, table, geometry, sub=(table, b"a", (None,)))
    with pytest.raises(ValueError, match="sub op 1 is x; allowed values: a, s, r, m, p"):
        _packed.ew_chain(y3, b"a", (None,), None, table, geometry,
                         sub=(table, b"ax", (np.float32(1), np.float32(1))))
    with pytest.raises(ValueError, match="operand 1 is None without sub"):
        _packed.ew_chain(y3, b"aa", (np.float32(1), None), None, table, geometry)
    # an empty batch is checked like any other before it returns its empty result
    empty = np.zeros((0, 5, 5), np.float32)
    assert _packed.ew_chain(empty, b"a", (np.float32(1),), None, table, geometry).shape == (
        0, 5, 5, 16)
    with pytest.raises(ValueError, match="the table's shape"):
        _packed.ew_chain(empty, b"a", (None,), None, table, geometry,
                         sub=(table[:256].copy(), b"", ()))


def test_merge_lookups_nests_one_level_only():
    """Three lookups of y_t, each sum read by the next: the second takes the first; the third
    cannot take the second (which holds a sub already), so every run is still scheduled."""
    from edge_runtime.chain import merge_lookups

    rng = np.random.default_rng(10)
    convs, luts, runs = [], {}, []
    for k in range(3):
        node, consts = _conv(rng, 16)
        conv = helper.make_node("Conv", node.input, [f"c{k}"], kernel_shape=[3, 3],
                                pads=[1, 1, 1, 1])
        add = helper.make_node("Add", [f"c{k}", f"a{k - 1}" if k else "s"], [f"a{k}"])
        luts[id(conv)] = lut.LutConv.build(node, consts)
        convs.append(conv)
        runs.append([conv, add])
    consumers = {f"c{k}": [runs[k][1]] for k in range(3)}
    consumers.update({f"a{k}": [runs[k + 1][1]] for k in range(2)})
    merged = merge_lookups(runs, consumers, {"a2"}, luts)
    assert [(run[0].output[0], sub[0].output[0] if sub else None) for run, sub in merged] == [
        ("c1", "c0"), ("c2", None)]


def _const(name, a):
    return helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.ravel())


def _block_inits(rng, c: int) -> list:
    """The stem models' other initializers: the image conv ``wi``, the step ``table``, the TB
    shift ``tb`` and the binary conv ``wb`` / ``sb`` / ``bb``."""
    w = np.where(rng.random((c, c, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    return [_const("wi", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
            _const("table", rng.standard_normal((11, c, 1, 1)).astype(np.float32)),
            _const("tb", rng.standard_normal((c, 1, 1)).astype(np.float32)),
            _const("wb", w), _const("sb", rng.random(c).astype(np.float32) + 0.1),
            _const("bb", rng.standard_normal(c).astype(np.float32))]


def _block_tail(x: str, skip: str, c: int) -> list:
    """``out = BinaryConv(x - tb) + skip``: the first binary block after a stem."""
    return [helper.make_node("Sub", [x, "tb"], ["s"]),
            helper.make_node("BinaryConv", ["s", "wb", "sb", "bb"], ["h"], domain="ai.hidiff",
                             kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1],
                             pads=[1, 1, 1, 1], pad_value=1.0, channels_in=c, channels_out=c),
            helper.make_node("Add", ["h", skip], ["out"])]


_STEM_INPUTS = [helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["N", 1, 12, 12]),
                helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 12, 12]),
                helper.make_tensor_value_info("step", TensorProto.INT64, ["N"])]


def _stem_model() -> onnx.ModelProto:
    """A refiner-like step: y_t (N, 1, 12, 12) -> Conv -> + image conv (static) -> * step row ->
    - tb -> BinaryConv -> + skip -> output (the stem of the cpu presets in miniature)."""
    rng = np.random.default_rng(11)
    c = 32
    inits = [_const("wy", rng.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             _const("by", rng.standard_normal(c).astype(np.float32)), *_block_inits(rng, c)]
    nodes = [helper.make_node("Conv", ["y_t", "wy", "by"], ["cy"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["image", "wi"], ["ci"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["cy", "ci"], ["a"]),
             helper.make_node("Gather", ["table", "step"], ["row"]),
             helper.make_node("Mul", ["a", "row"], ["m"]),
             *_block_tail("m", "m", c)]
    return binary_step_model(nodes, "stem", _STEM_INPUTS, inits)


@pytest.mark.parametrize("probe", [True, False])
def test_executor_stem_lookup_is_bit_exact(monkeypatch, probe):
    if not probe:
        monkeypatch.setattr(lut.LutConv, "_agrees_with_onnxruntime", lambda self: False)
    model = _stem_model()
    split = split_refiner(model)
    executor = StepExecutor(model, split)
    lookups = [label for label in executor.labels if label.startswith("numpy:Conv")]
    assert lookups == (["numpy:Conv+Add+Mul"] if probe else [])
    rng = np.random.default_rng(2)
    dynamic = make_session(split.dynamic.model)  # what the onnxruntime backend runs per step
    for y_t in ((rng.random((3, 1, 12, 12)) < 0.5).astype(np.float32),
                np.full((3, 1, 12, 12), 0.5, np.float32)):  # not 0/1: ORT's convolution
        values = {"y_t": y_t, "image": rng.standard_normal((3, 3, 12, 12)).astype(np.float32),
                  "step": np.array([1, 4, 9], np.int64)}
        for part in (split.static, split.step):
            out = make_session(part.model).run(part.outputs, {n: values[n] for n in part.inputs})
            values.update(zip(part.outputs, out, strict=True))
        feeds = {n: values[n] for n in split.dynamic.inputs}
        assert np.array_equal(_bits(executor.run(feeds)), _bits(dynamic.run(None, feeds)[0]))


def _two_lookups_model(read_twice: bool) -> onnx.ModelProto:
    """The stem of the cpu presets: two convolutions of y_t, the first plus a static map (its
    BatchNormalization), the second plus a static map times a step row, added together, then
    the first binary block; ``read_twice``: the output also reads the first lookup's sum."""
    rng = np.random.default_rng(12)
    c = 32
    inits = [_const("w1", rng.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             _const("w2", rng.standard_normal((c, 1, 3, 3)).astype(np.float32)),
             _const("b2", rng.standard_normal(c).astype(np.float32)), *_block_inits(rng, c)]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["image", "wi"], ["ci"], **conv),
             helper.make_node("Conv", ["y_t", "w1"], ["c1"], **conv),
             helper.make_node("Add", ["c1", "ci"], ["stem"]),
             helper.make_node("Conv", ["y_t", "w2", "b2"], ["c2"], **conv),
             helper.make_node("Add", ["ci", "c2"], ["a2"]),
             helper.make_node("Gather", ["table", "step"], ["row"]),
             helper.make_node("Mul", ["a2", "row"], ["m"]),
             helper.make_node("Add", ["stem", "m"], ["x"]),
             *_block_tail("x", "stem" if read_twice else "x", c)]
    return binary_step_model(nodes, "stem", _STEM_INPUTS, inits)


@pytest.mark.parametrize("read_twice", [False, True])
def test_executor_runs_two_lookups_in_one_pass(read_twice):
    """The stem's two lookups of y_t run as one pass (the first one's sum never stored) unless
    its sum is read elsewhere; bit-identical to onnxruntime either way, also through the
    fallback (y_t not 0/1)."""
    model = _two_lookups_model(read_twice)
    split = split_refiner(model)
    executor = StepExecutor(model, split)
    lookups = [label for label in executor.labels if label.startswith("numpy:Conv")]
    assert lookups == (["numpy:Conv+Add", "numpy:Conv+Add+Mul+Add"] if read_twice
                       else ["numpy:Conv+Add+Mul+Add+(Conv+Add)"])
    rng = np.random.default_rng(3)
    dynamic = make_session(split.dynamic.model)
    for y_t in ((rng.random((2, 1, 12, 12)) < 0.5).astype(np.float32),
                np.full((2, 1, 12, 12), 0.5, np.float32)):
        values = {"y_t": y_t, "image": rng.standard_normal((2, 3, 12, 12)).astype(np.float32),
                  "step": np.array([3, 7], np.int64)}
        for part in (split.static, split.step):
            out = make_session(part.model).run(part.outputs, {n: values[n] for n in part.inputs})
            values.update(zip(part.outputs, out, strict=True))
        feeds = {n: values[n] for n in split.dynamic.inputs}
        assert np.array_equal(_bits(executor.run(feeds)), _bits(dynamic.run(None, feeds)[0]))


def test_tiny_refiner_step_stays_bit_exact_for_any_y_t(refiner):
    exported, proto = refiner
    proto, _ = rewrite_refiner(proto)  # as the runtime runs it: the stem split per input
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    dynamic = make_session(split.dynamic.model)
    for seed, step, y_t in ((0, 10, None), (5, 4, None), (6, 2, 0.5)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        if y_t is not None:  # not a 0/1 state: the lookups fall back to ORT
            feeds[DYNAMIC_INPUT] = np.full_like(feeds[DYNAMIC_INPUT], y_t)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])


def test_runs_free_what_they_hold(refiner):
    """The executor frees the names its first run held (not the hundreds of values inside fused
    convs and chains), also through the lookups' fallback (y_t not 0/1); a run that holds a
    name it has not learned (here one made to be forgotten) teaches it, and the next run frees
    it: only the step's output and the feeds it never reads are left at the end of a run."""
    exported, proto = refiner
    proto, _ = rewrite_refiner(proto)
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    dynamic = make_session(split.dynamic.model)
    forgotten = None
    for k, y_t in enumerate((None, 0.5, None, None)):
        feeds = boundary_values(split, step_inputs(exported, k), 10, 2)
        if y_t is not None:
            feeds[DYNAMIC_INPUT] = np.full_like(feeds[DYNAMIC_INPUT], y_t)
        env = executor._execute(feeds)
        assert np.array_equal(env.get(executor.output), dynamic.run(None, feeds)[0])
        left = (set(env.nchw) | set(env.nhwc) | set(env.words)) - {executor.output} - (
            set(feeds) - set(executor._dies_at))
        assert left == ({forgotten} if k == 2 else set()), k
        if k == 1:  # forget a value the runs hold
            at, names = next((i, n) for i, n in enumerate(executor._free_seen)
                             if any(x not in feeds for x in n))
            forgotten = next(x for x in names if x not in feeds)
            names.remove(forgotten)
