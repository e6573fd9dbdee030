"""Tests for reference.time_conditioning: TB = sign(u - a), TA = prelu(u + zeta; beta) + gamma."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.time_conditioning import time_activation, time_binarization


def _param(rng, per_sample, n, c):
    shape = (n, c) if per_sample else (c,)
    return rng.integers(-3, 4, size=shape) / 2.0  # coarse grid: ties with u are frequent


def _rows(param, n, c):
    """The per-(sample, channel) value of a (C,) or (N, C) parameter, by explicit indexing."""
    return [[param[i, j] if param.ndim == 2 else param[j] for j in range(c)] for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 6),
    spatial=st.sampled_from([(), (4,), (3, 5)]),
    per_sample=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_time_binarization_formula(n, c, spatial, per_sample, seed):
    rng = np.random.default_rng(seed)
    u = rng.integers(-3, 4, size=(n, c) + spatial) / 2.0
    a = _param(rng, per_sample, n, c)
    out = time_binarization(u, a)
    assert out.dtype == np.float64 and out.shape == u.shape
    rows = _rows(a, n, c)
    for i in range(n):
        for j in range(c):
            for idx in np.ndindex(spatial):
                diff = u[(i, j) + idx] - rows[i][j]
                assert out[(i, j) + idx] == (-1.0 if diff < 0 else 1.0)


def test_time_binarization_tie_gives_plus_one():
    u = np.array([[[0.5, 0.25, 0.75]], [[-1.0, -1.0, -2.0]]])  # (N=2, C=1, 3)
    np.testing.assert_array_equal(time_binarization(u, [0.5]), [[[1, -1, 1]], [[-1, -1, -1]]])
    np.testing.assert_array_equal(
        time_binarization(u, [[0.25], [-1.0]]), [[[1, 1, 1]], [[1, 1, -1]]]
    )


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 6),
    spatial=st.sampled_from([(), (4,), (3, 5)]),
    per_sample=st.tuples(st.booleans(), st.booleans()),
    seed=st.integers(0, 2**32 - 1),
)
def test_time_activation_formula(n, c, spatial, per_sample, seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, c) + spatial)
    zeta = _param(rng, per_sample[0], n, c)
    gamma = _param(rng, per_sample[1], n, c)
    slope = rng.uniform(-0.5, 1.5, size=c)
    out = time_activation(u, zeta, gamma, slope)
    assert out.dtype == np.float64 and out.shape == u.shape
    z_rows, g_rows = _rows(zeta, n, c), _rows(gamma, n, c)
    for i in range(n):
        for j in range(c):
            for idx in np.ndindex(spatial):
                v = u[(i, j) + idx] + z_rows[i][j]
                expected = (v if v >= 0 else slope[j] * v) + g_rows[i][j]
                assert out[(i, j) + idx] == expected


def test_time_activation_slope_only_on_negative_side():
    u = np.array([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 5)
    out = time_activation(u, zeta=[0.0], gamma=[0.0], slope=[0.25])
    np.testing.assert_array_equal(out[0, 0], [-0.5, -0.25, 0.0, 1.0, 3.0])
    # The shift zeta moves the kink; gamma shifts the output after the PReLU.
    out = time_activation(u, zeta=[1.0], gamma=[10.0], slope=[0.5])
    np.testing.assert_array_equal(out[0, 0], [9.5, 10.0, 11.0, 12.0, 14.0])


def test_per_channel_broadcast_over_nchw():
    u = np.zeros((2, 3, 4, 5))
    out = time_binarization(u, [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(out[:, 0], 1)
    np.testing.assert_array_equal(out[:, 1], 1)  # u == a -> +1
    np.testing.assert_array_equal(out[:, 2], -1)
    out = time_activation(u, np.zeros((2, 3)), [[1, 2, 3], [4, 5, 6]], np.ones(3))
    np.testing.assert_array_equal(out[1, 2], 6)


def test_bad_parameter_shapes():
    u = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"thresholds.*\(3,\)"):
        time_binarization(u, np.zeros(4))
    with pytest.raises(ValueError, match="zeta"):
        time_activation(u, np.zeros((3, 3)), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="slope"):
        time_activation(u, np.zeros(3), np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="N, C"):
        time_binarization(np.zeros(3), np.zeros(3))
