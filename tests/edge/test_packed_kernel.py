"""The native packed binary-conv kernels (edge_runtime._packed) against the NumPy oracle.

Every kernel path this CPU supports is forced in turn; the integer result must equal
``reference.binary_conv2d`` exactly, the packing ``reference.bitpack`` exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import conv_geometry

from reference.binary_conv import binary_conv2d as ref_conv2d
from reference.bitpack import bitpack

try:
    from edge_runtime import _packed
    from edge_runtime import packed as K
except ImportError as exc:  # a build problem, never a silent skip
    pytest.fail(
        f"native extension edge_runtime._packed is not built ({exc}): run "
        "`python setup.py build_ext --inplace` or `pip install -e .`",
        pytrace=False,
    )

PATHS = K.available_paths()
CHANNELS = [1, 31, 32, 33, 65, 100]
OUT_CHANNELS = [1, 5, 16, 17, 33, 70]
SPECIAL = np.array([-1e-300, -0.0, 0.0, 1e-300, np.nan, -np.inf, np.inf, -1.5, 2.0])
# y = float32(int) * scale + bias is computed in float32 like NumPy does (two roundings), so it
# should match exactly; this tolerance only absorbs a compiler that contracts to an FMA.
FLOAT_RTOL = 1e-6
FLOAT_ATOL = 1e-5


def _ints(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Integers -2..2 as float32: frequent exact zeros (sign(0) = +1)."""
    return rng.integers(-2, 3, size=shape).astype(np.float32)


@st.composite
def conv_cases(draw):
    return {
        **draw(conv_geometry(extra=5)),
        "batch": draw(st.sampled_from([1, 2])),
        "cin": draw(st.sampled_from(CHANNELS)),
        "cout": draw(st.sampled_from(OUT_CHANNELS)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _make(case):
    rng = np.random.default_rng(case["seed"])
    x = _ints(rng, (case["batch"], case["cin"], *case["size"]))
    w = _ints(rng, (case["cout"], case["cin"], *case["kernel"]))
    geometry = {k: case[k] for k in ("stride", "padding", "dilation", "pad_value")}
    return rng, x, w, geometry


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=200, deadline=None)
@given(case=conv_cases())
def test_conv_matches_reference_exactly(path, case):
    _, x, w, geometry = _make(case)
    expected = ref_conv2d(x, w, **geometry)
    got = K.binary_conv2d(x, w, path=path, **geometry)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel, padding, dilation, stride",
                         [(3, 1, 1, 1), (3, 1, 1, 2), (5, 2, 1, 1), (3, 2, 2, 1), (1, 1, 1, 1)])
def test_zero_padding_on_wide_rows(path, kernel, padding, dilation, stride):
    """pad_value 0 on rows wide enough for whole pixel blocks inside the row's interior (where
    the kernels may skip the padding correction) and blocks over its edges, every border row."""
    rng = np.random.default_rng(100 * kernel + 10 * padding + stride)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "pad_value": 0.0}
    for cin, cout in [(32, 32), (33, 70), (64, 16), (32, 64)]:
        x = _ints(rng, (1, cin, 6, 45))
        w = _ints(rng, (cout, cin, kernel, kernel))
        np.testing.assert_array_equal(K.binary_conv2d(x, w, path=path, **geometry),
                                      ref_conv2d(x, w, **geometry))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=80, deadline=None)
@given(case=conv_cases())
def test_scale_bias_and_packed_output(path, case):
    rng, x, w, geometry = _make(case)
    cout = case["cout"]
    integer = ref_conv2d(x, w, **geometry).transpose(0, 2, 3, 1)  # NHWC
    scale = rng.uniform(0.01, 2.0, cout).astype(np.float32)
    bias = rng.normal(0.0, 3.0, cout).astype(np.float32)
    thresholds = rng.integers(-4, 5, cout).astype(np.float32)  # integers: exact ties y == thr
    stride, padding, dilation = geometry["stride"], geometry["padding"], geometry["dilation"]
    layer = K.PackedBinaryConv(w, stride=stride, padding=padding, dilation=dilation,
                               pad_value=geometry["pad_value"], scale=scale, bias=bias,
                               path=path)
    x_words = K.pack_nchw(x, path=path)
    expected = integer * scale + bias
    np.testing.assert_allclose(layer(x_words), expected, rtol=FLOAT_RTOL, atol=FLOAT_ATOL)

    plain = K.PackedBinaryConv(w, stride=stride, padding=padding, dilation=dilation,
                               pad_value=geometry["pad_value"], thresholds=thresholds, path=path)
    np.testing.assert_array_equal(plain.forward_packed(x_words), bitpack(integer - thresholds))
    two = K.PackedBinaryConv(w, stride=stride, padding=padding, dilation=dilation,
                             pad_value=geometry["pad_value"], path=path, threads=2)
    np.testing.assert_array_equal(two(x_words), integer)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    channels=st.integers(1, 100),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_packing_matches_bitpack(path, shape, channels, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*shape, channels)).astype(dtype)
    special = rng.random(x.shape) < 0.2
    x[special] = rng.choice(SPECIAL, size=int(special.sum())).astype(dtype)
    expected = bitpack(x)
    got = K.pack_nhwc(x, path=path)
    assert got.dtype == np.int32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if len(shape) == 3:  # treat x as NHWC and pack its NCHW transpose
        nchw = np.ascontiguousarray(np.moveaxis(x, -1, 1))
        np.testing.assert_array_equal(K.pack_nchw(nchw, path=path), expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cin,kernel", [(31, 5), (100, 5), (256, 3), (520, 1)])
def test_extreme_counts(path, cin, kernel):
    """All bits differ (or agree) on every tap: no per-byte/lane accumulator may overflow."""
    x = -np.ones((1, cin, 6, 7), np.float32)
    w = np.ones((3, cin, kernel, kernel), np.float32)
    w[1] = -1.0
    for pad_value in (1.0, 0.0):
        expected = ref_conv2d(x, w, padding=2, pad_value=pad_value)
        got = K.binary_conv2d(x, w, padding=2, pad_value=pad_value, path=path)
        np.testing.assert_array_equal(got, expected)
    assert expected[0, 1].max() == kernel * kernel * cin  # all agree (tap fully inside)


@pytest.mark.parametrize("path", PATHS)
def test_large_layers_split_channels_into_passes(path):
    """Prepared weights beyond ~512 KiB are processed in several passes over the rows."""
    rng = np.random.default_rng(5)
    for cin, cout in [(256, 300), (8192, 70)]:
        x, w = _ints(rng, (1, cin, 4, 5)), _ints(rng, (cout, cin, 3, 3))
        for pad_value in (1.0, 0.0):
            expected = ref_conv2d(x, w, padding=1, pad_value=pad_value)
            got = K.binary_conv2d(x, w, padding=1, pad_value=pad_value, path=path)
            np.testing.assert_array_equal(got, expected)


def test_weights_layout_is_ohwi_bitpack():
    w = _ints(np.random.default_rng(0), (7, 40, 3, 2))
    np.testing.assert_array_equal(K.pack_weights(w), bitpack(np.moveaxis(w, 1, -1)))


def test_paths_and_default_path():
    assert PATHS[-1] == "portable" and K.current_path() == PATHS[0]
    try:
        for path in PATHS:
            K.set_path(path)
            assert K.current_path() == path
    finally:
        K.set_path(None)
    assert K.current_path() == PATHS[0]
    for name in ["neon", "AVX2", ""]:
        with pytest.raises(ValueError, match="allowed values"):
            K.set_path(name)


def test_prepared_weights_and_out_buffer():
    rng = np.random.default_rng(3)
    x, w = _ints(rng, (1, 33, 6, 5)), _ints(rng, (9, 33, 3, 3))
    words, xw = K.pack_weights(w), K.pack_nchw(x)
    expected = ref_conv2d(x, w, padding=1).transpose(0, 2, 3, 1)
    for path in PATHS:
        prepared = _packed.prepare(words, 33, 3, 3, path=path)
        assert _packed.prepared_info(prepared)["path"] == path
        out = np.full((1, 6, 5, 9), np.nan, np.float32)
        res = _packed.bconv2d(xw, prepared, 33, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, out=out)
        assert res is out
        np.testing.assert_array_equal(out, expected)
        for other in (p for p in PATHS if p != path):
            with pytest.raises(ValueError, match="prepared for path"):
                _packed.bconv2d(xw, prepared, 33, 3, 3, 1, 1, 1, 1, 1, 1, 1.0, path=other)
        with pytest.raises(ValueError, match="prepared weights are for"):
            _packed.bconv2d(xw, prepared, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1.0)


def test_bad_arguments_raise_value_error():
    rng = np.random.default_rng(4)
    x, w = _ints(rng, (1, 8, 5, 5)), _ints(rng, (4, 8, 3, 3))
    xw, ww = K.pack_nchw(x), K.pack_weights(w)
    geometry = (1, 1, 0, 0, 1, 1)

    def raw(*args, **kwargs):
        return _packed.bconv2d(*args, **kwargs)

    bad_calls = [
        lambda: K.binary_conv2d(x, w, path="neon"),
        lambda: K.binary_conv2d(x, w, pad_value=0.5),
        lambda: K.binary_conv2d(x, w, stride=0),
        lambda: K.binary_conv2d(x, w, padding=-1),
        lambda: K.binary_conv2d(x, w, dilation=(1, 0)),
        lambda: K.binary_conv2d(x, w[:, :7]),  # channel mismatch
        lambda: K.binary_conv2d(x[:, :, :2, :2], w),  # empty output
        lambda: K.binary_conv2d(x, w, scale=np.ones(3)),
        lambda: K.binary_conv2d(x[0], w),
        lambda: K.PackedBinaryConv(w, threads=0),
        lambda: K.PackedBinaryConv(w).forward_packed(xw),  # no thresholds
        lambda: K.PackedBinaryConv.from_packed(ww, 40),  # 40 channels need 2 words
        lambda: raw(xw, ww, 8, 3, 3, *geometry, 1.0, path="avx1024"),
        lambda: raw(xw, ww, 8, 3, 3, *geometry, 2.0),
        lambda: raw(xw, ww, 8, 3, 2, *geometry, 1.0),  # kernel does not match w
        lambda: raw(xw, ww, 40, 3, 3, *geometry, 1.0),  # word count does not match cin
        lambda: raw(xw.astype(np.float32), ww, 8, 3, 3, *geometry, 1.0),  # not words
        lambda: raw(xw[..., ::2, :], ww, 8, 3, 3, *geometry, 1.0),  # not contiguous
        lambda: raw(xw, ww, 8, 3, 3, *geometry, 1.0, out=np.empty((1, 3, 3, 5), np.float32)),
        lambda: raw(xw, ww, 8, 3, 3, *geometry, 1.0, out=np.empty((1, 3, 3, 4), np.float64)),
        lambda: raw(xw, ww, 8, 3, 3, *geometry, 1.0, thresholds=np.zeros(5, np.float32)),
        lambda: raw(xw, ww, 8, 3, 3, 1, 1, 0, 0, 1, 1, 1.0, threads=0),
        lambda: _packed.pack(np.zeros((2, 3), np.int32)),
        lambda: K.pack_nchw(np.zeros((2, 3, 4))),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call #{i} did not raise")


def _epilogue_oracle(y, res, zeta, slope, gamma):
    """NumPy float32, one operation at a time in the ONNX graph's order."""
    v = y if res is None else y + res
    if zeta is not None:
        v = v + (zeta if zeta.ndim == 1 else zeta[:, None, None, :])
    if slope is not None:
        v = np.where(v < 0, v * slope, v)
    if gamma is not None:
        v = v + (gamma if gamma.ndim == 1 else gamma[:, None, None, :])
    return v.astype(np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cin, cout, stride", [(32, 32, 1), (40, 24, 2), (100, 70, 1),
                                               (256, 300, 1)])
def test_fused_epilogue_and_packed_next_input(path, cin, cout, stride):
    """bconv2d's epilogue (residual, zeta, PRelu, gamma; per-channel or per-item vectors, any
    subset) and its second output, the words of ``y - sub``, equal the ops one by one bit for
    bit, also in place in the residual's buffer and with channel passes (256 -> 300)."""
    rng = np.random.default_rng(cin + cout)
    n = 2
    x = rng.standard_normal((n, 7, 9, cin)).astype(np.float32)
    x.ravel()[:SPECIAL.size] = SPECIAL.astype(np.float32)
    sub = (rng.standard_normal((n, cin)) * 0.3).astype(np.float32)
    words = K.pack_nhwc(x, sub=sub, path=path)
    np.testing.assert_array_equal(words, bitpack(x - sub[:, None, None, :]))
    np.testing.assert_array_equal(K.pack_nhwc(x, sub=sub[0], path=path), bitpack(x - sub[0]))
    w = _ints(rng, (cout, cin, 3, 3))
    layer = K.PackedBinaryConv(w, stride=stride, padding=1, path=path,
                               scale=rng.random(cout).astype(np.float32) + 0.1,
                               bias=rng.standard_normal(cout).astype(np.float32))
    y = layer(words)
    res = rng.standard_normal(y.shape).astype(np.float32)
    res.ravel()[:4] = [0.0, -0.0, np.inf, np.nan]
    vec = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nxt = vec(n, cout)
    for mask in range(1, 16):
        args = {"residual": res if mask & 1 else None,
                "zeta": (vec(cout) if mask & 4 else vec(n, cout)) if mask & 2 else None,
                "slope": rng.random(cout).astype(np.float32) if mask & 4 else None,
                "gamma": vec(n, cout) if mask & 8 else None}
        want = _epilogue_oracle(y, args["residual"], args["zeta"], args["slope"], args["gamma"])
        got, got_words = layer.fused(words, pack_sub=nxt, **args)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
        np.testing.assert_array_equal(got_words, bitpack(want - nxt[:, None, None, :]))
        if mask & 1:  # the output takes the residual's buffer
            buf = res.copy()
            got = layer.fused(words, out=buf, **dict(args, residual=buf))
            assert got is buf
            np.testing.assert_array_equal(buf.view(np.int32), want.view(np.int32))


def test_fused_epilogue_bad_arguments():
    layer = K.PackedBinaryConv(np.ones((8, 32, 3, 3), np.float32), padding=1)
    words = K.pack_nhwc(np.ones((1, 4, 4, 32), np.float32))
    res = np.zeros((1, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="zeta"):
        layer.fused(words, zeta=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="residual"):
        layer.fused(words, residual=np.zeros((1, 4, 4, 7), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        big = np.zeros(2 * res.size, np.float32)
        layer.fused(words, residual=big[8:8 + res.size].reshape(res.shape),
                    out=big[:res.size].reshape(res.shape))
    with pytest.raises(ValueError, match="thresholds"):
        _packed.bconv2d(words, layer._prepared, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1.0,
                        thresholds=np.zeros(8, np.float32), residual=res)
    with pytest.raises(ValueError, match="sub"):
        K.pack_nhwc(np.ones((2, 3, 32), np.float32), sub=np.zeros((3, 32), np.float32))


@pytest.mark.parametrize("geometry", [
    # (kh, kw, sh, sw, ph, pw, dh, dw): values whose products overflow 32-bit ints
    (1, 1, 1, 1, 2**31 - 1, 2**31 - 1, 1, 1),
    (3, 3, 2**30, 2**30, 0, 0, 2**30, 2**30),
    (3, 3, 1, 1, 70000, 0, 1, 1),
])
def test_huge_geometry_is_refused_not_a_crash(geometry):
    # a corrupt model could carry such attributes: the kernel must raise, never write out of
    # bounds (these crashed the process before the bounds were checked in 64-bit arithmetic)
    from edge_runtime import _packed

    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    x = np.zeros((1, 4, 4, 1), np.int32)
    w = np.zeros((1, kh, kw, 1), np.int32)
    with pytest.raises(ValueError):
        _packed.bconv2d(x, w, 32, kh, kw, sh, sw, ph, pw, dh, dw, 1.0)
