"""Native elementwise chains (``_packed.ew_chain``, ``edge_runtime.chain``) against NumPy.

Every op of a chain is one float32 operation in the graph's order, so a chain equals the NumPy
ops one by one bit for bit: checked with hypothesis over op sequences, operand kinds (full, one
shared batch item, per-channel shared / per item, scalar), channel counts on both code paths
(C a multiple of 16: in registers; otherwise in chunks), every instruction set's variant
(``set_path``) and values with exact zeros (both signs), infinities, NaN and subnormals;
``out`` may be ``x`` or a full operand. In the packed
executor, chains appear on the exported tiny model and their fallback (operands of unexpected
shape) is bit-exact too. A chain can also write the next binary layer's packed input. The 2x
nearest upsampling (alone, or as a chain's start) equals
onnxruntime's ``Resize`` exactly; other resizes stay in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from refiner_feeds import boundary_values, step_inputs

from edge_runtime import _packed, chain, packed, resize
from edge_runtime.executor import StepExecutor
from edge_runtime.graph import split_refiner
from edge_runtime.ortutil import make_session

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38], np.float32)
NUMPY = {"a": lambda v, o: v + o, "s": lambda v, o: v - o, "r": lambda v, o: o - v,
         "m": lambda v, o: v * o, "p": lambda v, o: np.where(v < 0, v * o, v)}


def _values(rng, shape):
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, min(flat.size, 12))] = rng.choice(SPECIAL, min(flat.size, 12))
    return x


@settings(max_examples=60, deadline=None)
@given(ops=st.text("asrmp", min_size=1, max_size=6), channels=st.sampled_from([32, 16, 24, 3]),
       batch=st.sampled_from([1, 3]), kinds=st.lists(st.sampled_from(
           ["full", "item", "channel", "channel_n", "scalar"]), min_size=6, max_size=6),
       seed=st.integers(0, 2**16), into=st.sampled_from(["new", "x", "operand"]))
def test_chain_equals_numpy_ops_one_by_one(ops, channels, batch, kinds, seed, into):
    rng = np.random.default_rng(seed)
    shape = (batch, 3, 5, channels)
    x = _values(rng, shape)
    operands, views = [], []
    for op, kind in zip(ops, kinds, strict=False):
        if op == "p":  # PReLU slopes are per channel, either side of [0, 1]
            kind = "channel"
        if kind == "full":
            o = _values(rng, shape)
            view = o
        elif kind == "item":
            o = _values(rng, (1, *shape[1:]))
            view = o
        elif kind == "channel":
            o = _values(rng, (channels,))
            view = o.reshape(1, 1, 1, channels)
        elif kind == "channel_n":
            o = _values(rng, (batch, channels))
            view = o.reshape(batch, 1, 1, channels)
        else:
            o = _values(rng, (1,))
            view = o.reshape(1, 1, 1, 1)
        operands.append(o)
        views.append(view)
    want = x
    for op, view in zip(ops, views, strict=True):
        with np.errstate(all="ignore"):
            want = NUMPY[op](want, view).astype(np.float32)
    full = [o for o, k in zip(operands, kinds, strict=False) if o.shape == shape]
    nan = np.isnan(want)
    for path in _packed.available_paths():  # each instruction set's variant
        _packed.set_path(path)
        try:
            out = {"new": None, "x": x.copy(), "operand": full[0].copy() if full else None}[into]
            args = tuple(out if (into == "operand" and full and o is full[0]) else o
                         for o in operands)
            got = _packed.ew_chain(out if into == "x" else x, ops.encode(), args, out)
        finally:
            _packed.set_path(None)
        assert got.shape == shape
        assert out is None or got is out
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_chain_bad_arguments():
    x = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="op 0 is x; allowed values: a, s, r, m, p"):
        _packed.ew_chain(x, b"x", (np.zeros(4, np.float32),))
    with pytest.raises(ValueError, match="operand 0 has 3 values in 1 dimensions"):
        _packed.ew_chain(x, b"a", (np.zeros(3, np.float32),))
    with pytest.raises(ValueError, match="one array per op"):
        _packed.ew_chain(x, b"aa", (np.zeros(4, np.float32),))
    with pytest.raises(ValueError, match="float32"):
        _packed.ew_chain(x.astype(np.float64), b"a", (np.zeros(4, np.float32),))
    with pytest.raises(ValueError, match="wrong shape"):
        _packed.ew_chain(x, b"a", (np.zeros(4, np.float32),), np.zeros((1, 2, 2, 5), np.float32))


@pytest.mark.parametrize("native", [True, False])
def test_executor_chains_are_bit_exact(refiner, monkeypatch, native):
    exported, proto = refiner
    if not native:  # every chain falls back to its nodes one by one
        monkeypatch.setattr(chain, "_operand", lambda a, shape: None)
    split = split_refiner(proto)
    executor = StepExecutor(proto, split)
    assert any(label.startswith("numpy:") and "+" in label for label in executor.labels)
    dynamic = make_session(split.dynamic.model)
    for seed, step in ((0, 10), (4, 2)):
        feeds = boundary_values(split, step_inputs(exported, seed), step, 2)
        assert np.array_equal(executor.run(feeds), dynamic.run(None, feeds)[0])


def _ort_resize(x_nchw, **attrs):
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x_nchw.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return node, {"scales": np.array([1, 1, 2, 2], np.float32)}, make_session(model).run(
        None, {"x": x_nchw})[0]


NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
           "nearest_mode": "floor"}


@pytest.mark.parametrize("channels", [32, 24, 3])
def test_upsampling_equals_onnxruntime_alone_and_as_a_chain_start(channels):
    rng = np.random.default_rng(channels)
    x = _values(rng, (2, channels, 5, 7))
    node, consts, want = _ort_resize(x, **NEAREST)
    assert resize.supported(node, consts)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    want = np.ascontiguousarray(want.transpose(0, 2, 3, 1))
    got = resize.upsample_2x(x_nhwc)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    other = _values(rng, want.shape)
    scale = _values(rng, (channels,))
    chained = _packed.ew_chain(x_nhwc, b"am", (other, scale), upsample=True)
    with np.errstate(all="ignore"):
        expect = (want + other) * scale
    nan = np.isnan(expect)
    assert np.array_equal(np.isnan(chained), nan)
    assert np.array_equal(chained[~nan].view(np.uint32), expect[~nan].view(np.uint32))


def test_other_resizes_are_left_to_onnxruntime():
    x = np.zeros((1, 4, 3, 3), np.float32)
    for attrs in ({**NEAREST, "mode": "linear"}, {**NEAREST, "nearest_mode": "round_prefer_floor"},
                  {**NEAREST, "coordinate_transformation_mode": "half_pixel"}):
        node, consts, _ = _ort_resize(x, **attrs)
        assert not resize.supported(node, consts)
    node, _, _ = _ort_resize(x, **NEAREST)
    assert not resize.supported(node, {"scales": np.array([1, 1, 3, 3], np.float32)})
    with pytest.raises(ValueError, match="exclusive"):
        _packed.ew_chain(np.zeros((1, 2, 2, 4), np.float32), b"", (), None,
                         np.zeros((512, 4), np.float32), (3, 3, 1, 1), True)


def test_threads_split_rows_without_changing_a_bit():
    """Large enough to split (the native passes keep one thread below a minimum chunk)."""
    rng = np.random.default_rng(9)
    x = _values(rng, (3, 40, 64, 32))
    full, item = _values(rng, x.shape), _values(rng, (1, *x.shape[1:]))
    ch = _values(rng, (3, 32))
    one = _packed.ew_chain(x, b"amsp", (full, ch, item, np.abs(ch[0])))
    two = _packed.ew_chain(x, b"amsp", (full, ch, item, np.abs(ch[0])), threads=2)
    assert np.array_equal(one.view(np.uint32), two.view(np.uint32))
    low = np.ascontiguousarray(x[:, :20, :32])
    up = _packed.ew_chain(low, b"a", (full,), upsample=True, threads=2)
    with np.errstate(all="ignore"):
        want = np.repeat(np.repeat(low, 2, 1), 2, 2) + full
    assert np.array_equal(up, want, equal_nan=True)
    y = (rng.random((3, 1, 40, 64)) < 0.5).astype(np.float32)
    table = _values(rng, (512, 32))
    lut_one = _packed.ew_chain(y[:, 0], b"", (), None, table, (3, 3, 1, 1))
    lut_two = _packed.ew_chain(y[:, 0], b"", (), None, table, (3, 3, 1, 1), threads=2)
    assert np.array_equal(lut_one.view(np.uint32), lut_two.view(np.uint32))
    w, b = _values(rng, (32, 48)), _values(rng, (48,))
    one = _packed.pointwise(x, w, b)
    assert np.array_equal(one.view(np.uint32), _packed.pointwise(x, w, b, threads=2).view(
        np.uint32))


@pytest.mark.parametrize("channels", [32, 24])  # the in-register and the chunked path
@pytest.mark.parametrize("threads", [1, 2])
def test_shared_item_operands_run_in_tiles_over_the_batch(channels, threads):
    """With an operand shared by the batch items the pass goes tile by tile over the items
    (each shared tile read once): many tiles per item, a partial last one, the result written
    into a full operand's buffer and the packed words, equal to the ops one by one."""
    rng = np.random.default_rng(channels + threads)
    shape = (3, 37, 61, channels)  # 2257 pixels per item: not a whole number of tiles
    x, full = _values(rng, shape), _values(rng, shape)
    item, ch = _values(rng, (1, *shape[1:])), _values(rng, (3, channels))
    psub = _values(rng, (channels,))
    with np.errstate(all="ignore"):
        want = (((x + item) * ch[:, None, None, :]) - full).astype(np.float32)
        bits = (want - psub) < 0
    expect = np.zeros((*shape[:3], (channels + 31) // 32), np.uint32)
    for c in range(channels):
        expect[..., c // 32] |= bits[..., c].astype(np.uint32) << (c % 32)
    for path in _packed.available_paths():
        _packed.set_path(path)
        try:
            out, words = full.copy(), np.empty(expect.shape, np.int32)
            got = _packed.ew_chain(x, b"ams", (item, ch, out), out, threads=threads,
                                   pack_sub=psub, words=words)
        finally:
            _packed.set_path(None)
        assert got is out
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan), path
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), path
        assert np.array_equal(words.view(np.uint32), expect), path


@pytest.mark.parametrize("channels", [32, 24])  # the in-register and the chunked path
def test_a_negative_zero_scalar_stays_negative(channels):
    """-0 + -0 is -0: a scalar operand must reach the op as itself (found by hypothesis)."""
    x = np.full((1, 2, 3, channels), -0.0, np.float32)
    got = _packed.ew_chain(x, b"a", (np.array([-0.0], np.float32),))
    assert np.signbit(got).all()


@pytest.mark.parametrize("channels", [32, 64, 24, 40])
def test_chain_writes_the_next_layers_packed_input(channels):
    """pack_sub / words: the sign words of result - sub equal packed.pack_nhwc's of the result
    (signed zeros, NaN, infinities), on every instruction set's variant, shared or per item."""
    rng = np.random.default_rng(channels)
    x = _values(rng, (2, 5, 7, channels))
    full = _values(rng, x.shape)
    with np.errstate(all="ignore"):
        result = x * full
    for sub in (_values(rng, (2, channels)), _values(rng, (channels,))):
        want = packed.pack_nhwc(result, sub=sub)
        for path in _packed.available_paths():
            _packed.set_path(path)
            try:
                words = np.full(want.shape, -1, np.int32)  # the pass zeroes them first
                got = _packed.ew_chain(x, b"m", (full,), pack_sub=sub, words=words)
            finally:
                _packed.set_path(None)
            assert np.array_equal(words, want), path
            assert np.array_equal(got, result, equal_nan=True)
    with pytest.raises(ValueError, match="go together"):
        _packed.ew_chain(x, b"m", (full,), pack_sub=sub)
    with pytest.raises(ValueError, match="words must hold"):
        _packed.ew_chain(x, b"m", (full,), pack_sub=sub, words=np.zeros(3, np.int32))


def test_operand_kinds_come_from_shapes_not_lengths():
    """(N, C) per-item vectors where H * W == N have as many values as one item: still per item
    (found in review); an empty batch computes nothing."""
    rng = np.random.default_rng(4)
    for shape in ((4, 2, 2, 16), (2, 1, 2, 24)):
        x = _values(rng, shape)
        per_item = _values(rng, (shape[0], shape[3]))
        with np.errstate(all="ignore"):
            want = x * per_item[:, None, None, :]
        got = _packed.ew_chain(x, b"m", (per_item,))
        assert np.array_equal(got, want, equal_nan=True)
    empty = _packed.ew_chain(np.zeros((0, 4, 4, 16), np.float32), b"a",
                             (np.zeros(16, np.float32),))
    assert empty.shape == (0, 4, 4, 16)
    lut_empty = _packed.ew_chain(np.zeros((0, 4, 4), np.float32), b"", (), None,
                                 np.zeros((512, 16), np.float32), (3, 3, 1, 1))
    assert lut_empty.shape == (0, 4, 4, 16)
    with pytest.raises(ValueError, match=r"\(N, C\) or one value"):
        _packed.ew_chain(np.zeros((2, 2, 2, 16), np.float32), b"a",
                         (np.zeros((2, 2, 16), np.float32),))
