"""Tests for reference.binary_conv: XNOR-popcount conv and linear vs float64 oracles (method §7)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import correlate
from strategies import conv_geometry

from reference.binary_conv import binary_conv2d, binary_linear

CHANNELS = [1, 31, 32, 33, 65]
SPECIAL = np.array([-1e-300, -0.0, 0.0, 1e-300, np.nan, -np.inf, np.inf])


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Mostly integers in -2..2 as floats (frequent exact zeros), some special values."""
    out = rng.integers(-2, 3, size=shape).astype(np.float64)
    special = rng.random(shape) < 0.05
    out[special] = rng.choice(SPECIAL, size=int(special.sum()))
    return out


def _sign64(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, -1.0, 1.0)


def _float_conv(x, w, stride, padding, dilation, pad_value):
    """Independent float64 cross-correlation of sign(x) (padded with pad_value) and sign(w)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    _, _, kh, kw = w.shape
    xs = np.pad(_sign64(x), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = sliding_window_view(xs, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    return np.einsum("nchwij,ocij->nohw", windows, _sign64(w))


@st.composite
def conv_cases(draw):
    return {
        **draw(conv_geometry(extra=4)),
        "batch": draw(st.sampled_from([1, 2])),
        "channels": draw(st.sampled_from(CHANNELS)),
        "out_channels": draw(st.sampled_from([1, 2, 5])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _case(channels, kernel, stride, padding, dilation, pad_value, size=(7, 6), seed=0):
    return {
        "batch": 2,
        "channels": channels,
        "out_channels": 3,
        "kernel": (kernel, kernel),
        "size": size,
        "stride": (stride, stride),
        "padding": (padding, padding),
        "dilation": (dilation, dilation),
        "pad_value": pad_value,
        "seed": seed,
    }


@settings(max_examples=400, deadline=None)
@given(conv_cases())
@example(_case(1, 3, 1, 1, 1, 0.0))
@example(_case(31, 3, 2, 1, 1, 0.0))
@example(_case(32, 5, 1, 2, 2, 1.0, size=(9, 9)))
@example(_case(33, 5, 2, 2, 1, 0.0))
@example(_case(65, 3, 1, 2, 2, 0.0))
@example(_case(65, 1, 2, 0, 1, 1.0))
def test_conv_matches_float_conv(case):
    rng = np.random.default_rng(case["seed"])
    x = _values(rng, (case["batch"], case["channels"]) + case["size"])
    w = _values(rng, (case["out_channels"], case["channels"]) + case["kernel"])
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "pad_value")}
    got = binary_conv2d(x, w, **kwargs)
    expected = _float_conv(x, w, **kwargs)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("pad_value", [1.0, 0.0])
def test_conv_matches_scipy(pad_value):
    rng = np.random.default_rng(7)
    x, w = _values(rng, (1, 33, 8, 9)), _values(rng, (4, 33, 3, 3))
    xs = np.pad(_sign64(x), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=pad_value)
    expected = np.stack(
        [correlate(xs[0], _sign64(w[o]), mode="valid", method="direct")[0] for o in range(4)]
    )[None]
    np.testing.assert_array_equal(binary_conv2d(x, w, padding=1, pad_value=pad_value), expected)


def test_conv_hand_made():
    x = np.zeros((1, 1, 3, 3))  # sign(0) = +1 everywhere
    w = np.full((1, 1, 3, 3), 0.25)
    np.testing.assert_array_equal(binary_conv2d(x, w, padding=1, pad_value=1.0)[0, 0], 9)
    np.testing.assert_array_equal(
        binary_conv2d(x, w, padding=1, pad_value=0.0)[0, 0], [[4, 6, 4], [6, 9, 6], [4, 6, 4]]
    )
    # Negative weights flip the sign; the zero-pad correction uses sign(w), not w.
    np.testing.assert_array_equal(
        binary_conv2d(x, -w, padding=1, pad_value=0.0)[0, 0],
        [[-4, -6, -4], [-6, -9, -6], [-4, -6, -4]],
    )


def test_conv_output_shape_and_tuple_args():
    x = np.ones((2, 3, 11, 8))
    w = np.ones((4, 3, 3, 5))
    out = binary_conv2d(x, w, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    assert out.shape == (2, 4, (11 + 2 - 2 - 1) // 2 + 1, (8 + 4 - 8 - 1) // 1 + 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 45.0)  # all +1 (input, weights and +1 padding)


@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_bad_pad_value(bad):
    with pytest.raises(ValueError, match=r"pad_value.*\(1\.0, 0\.0\)"):
        binary_conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), pad_value=bad)


def test_channel_mismatch():
    with pytest.raises(ValueError, match=r"channel mismatch.*\b5\b.*\b4\b"):
        binary_conv2d(np.ones((1, 5, 4, 4)), np.ones((2, 4, 3, 3)))


def test_bad_geometry():
    x, w = np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3))
    with pytest.raises(ValueError, match="empty output"):
        binary_conv2d(x, w, dilation=2)
    with pytest.raises(ValueError, match="padding"):
        binary_conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        binary_conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="NCHW"):
        binary_conv2d(np.ones((1, 4, 4)), w)


# ---- binary_linear ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    in_features=st.one_of(st.sampled_from(CHANNELS + [64, 96, 128]), st.integers(1, 200)),
    out_features=st.integers(1, 9),
    lead=st.sampled_from([(), (1,), (4,), (2, 3)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_matches_matmul(in_features, out_features, lead, seed):
    rng = np.random.default_rng(seed)
    x = _values(rng, lead + (in_features,))
    w = _values(rng, (out_features, in_features))
    got = binary_linear(x, w)
    expected = _sign64(x) @ _sign64(w).T
    assert got.dtype == np.float32 and got.shape == lead + (out_features,)
    np.testing.assert_array_equal(got, expected)


def test_linear_feature_mismatch():
    with pytest.raises(ValueError, match=r"feature mismatch.*\b7\b.*\b6\b"):
        binary_linear(np.ones((2, 7)), np.ones((3, 6)))
