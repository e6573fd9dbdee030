"""Oracle tests for hidiff.quantizers: forward sign(0) = +1, pseudo-gradients exactly (method §7).

The oracles are written in NumPy float64 from the formulas, independently of the torch code:

* forward: ``where(x < 0, -1, +1)``
* ste_sign backward: ``g * 1[|x| <= 1]``
* approx_sign backward: ``g * (2 + 2x)`` on [-1, 0), ``g * (2 - 2x)`` on [0, 1), 0 elsewhere

Inputs mix random floats with the values where the formulas switch branch: 0, -0.0, +-1 and their
float64 neighbours. Gradients are compared exactly (same IEEE float64 operations on both sides).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hidiff.quantizers import (
    QUANTIZER_NAMES,
    approx_sign,
    get_quantizer,
    identity,
    magnitude_aware_sign,
    ste_sign,
)

_EDGES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    np.nextafter(1.0, 0.0),
    np.nextafter(1.0, 2.0),
    np.nextafter(-1.0, 0.0),
    np.nextafter(-1.0, -2.0),
    np.nextafter(0.0, 1.0),
    np.nextafter(0.0, -1.0),
    0.5,
    -0.5,
]
_ELEMENTS = st.one_of(
    st.sampled_from(_EDGES),
    st.floats(-3.0, 3.0, allow_nan=False, width=64),
    st.integers(-2, 2).map(float),
)
#: float64 mean of at most a few hundred terms, summed in a different order by torch and numpy.
SCALE_RTOL = 1e-13
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)


def _arrays(dtype=np.float64):
    return hnp.arrays(dtype, _SHAPES, elements=_ELEMENTS)


def _sign_oracle(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, -1.0, 1.0)


def _ste_grad_oracle(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) <= 1.0, g, 0.0)


def _approx_grad_oracle(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    # Written piecewise on purpose (not via |x|) so it is a second derivation of the formula.
    neg = (x >= -1.0) & (x < 0.0)
    pos = (x >= 0.0) & (x < 1.0)
    return np.where(neg, g * (2.0 + 2.0 * x), np.where(pos, g * (2.0 - 2.0 * x), 0.0))


QUANTIZERS = {
    "ste_sign": (ste_sign, _ste_grad_oracle),
    "approx_sign": (approx_sign, _approx_grad_oracle),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@settings(max_examples=200, deadline=None)
@given(x=_arrays())
def test_forward_is_sign_with_zero_positive(name, x):
    fn, _ = QUANTIZERS[name]
    xt = torch.from_numpy(x)
    out = fn(xt)
    assert out.dtype == xt.dtype and out.shape == xt.shape
    np.testing.assert_array_equal(out.numpy(), _sign_oracle(x))
    # the same under autograd (the Function path, not the no-grad shortcut)
    out_g = fn(xt.clone().requires_grad_(True))
    np.testing.assert_array_equal(out_g.detach().numpy(), _sign_oracle(x))


def test_forward_edge_values():
    values = [0.0, -0.0, float("nan"), -1e-300, 1e-300, float("inf"), -float("inf")]
    x = torch.tensor(values, dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    for fn in (ste_sign, approx_sign):
        assert torch.equal(fn(x), expected)
        assert torch.equal(fn(x.clone().requires_grad_(True)).detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_forward_keeps_dtype(name, dtype):
    fn, _ = QUANTIZERS[name]
    x = torch.tensor([-2.0, -0.0, 0.0, 0.3], dtype=dtype, requires_grad=True)
    out = fn(x)
    assert out.dtype == dtype
    assert out.tolist() == [-1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_gradient_equals_pseudo_gradient_exactly(name, data):
    fn, oracle = QUANTIZERS[name]
    x = data.draw(_arrays(), label="x")
    g = data.draw(
        hnp.arrays(np.float64, x.shape, elements=st.floats(-4.0, 4.0, allow_nan=False, width=64)),
        label="upstream grad",
    )
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    fn(xt).backward(torch.from_numpy(g))
    np.testing.assert_array_equal(xt.grad.numpy(), oracle(x, g))


def test_gradient_boundaries():
    x = torch.tensor([-1.5, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5], dtype=torch.float64)
    ste_expected = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    approx_expected = [0.0, 0.0, 1.0, 2.0, 2.0, 1.0, 0.0, 0.0]
    for fn, expected in ((ste_sign, ste_expected), (approx_sign, approx_expected)):
        xt = x.clone().requires_grad_(True)
        fn(xt).sum().backward()
        assert xt.grad.tolist() == expected


def test_no_grad_shortcut_matches_function():
    x = torch.linspace(-2, 2, 41)
    with torch.no_grad():
        a = approx_sign(x.clone().requires_grad_(True))
    assert a.grad_fn is None
    assert torch.equal(a, approx_sign(x.clone().requires_grad_(True)).detach())


def test_get_quantizer_names():
    assert get_quantizer("approx_sign") is approx_sign
    assert get_quantizer("ste_sign") is ste_sign
    assert get_quantizer(None) is identity
    assert set(QUANTIZER_NAMES) == {"approx_sign", "ste_sign", None}
    x = torch.tensor([-1.0, 1.0, 1.0])
    assert get_quantizer(None)(x) is x


@pytest.mark.parametrize("bad", ["sign", "", "ApproxSign", 1, ["ste_sign"]])
def test_get_quantizer_rejects_unknown(bad):
    with pytest.raises(ValueError) as info:
        get_quantizer(bad)
    msg = str(info.value)
    assert "'approx_sign'" in msg and "'ste_sign'" in msg and "None" in msg


@settings(max_examples=100, deadline=None)
@given(
    w=hnp.arrays(
        np.float64,
        st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=7),
            hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4),
        ),
        elements=_ELEMENTS,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_magnitude_aware_sign(w, seed):
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    sw, scale = magnitude_aware_sign(wt)
    np.testing.assert_array_equal(sw.detach().numpy(), _sign_oracle(w))
    expected_shape = (w.shape[0],) + (1,) * (w.ndim - 1)
    assert tuple(scale.shape) == expected_shape
    assert not scale.requires_grad and scale.grad_fn is None
    axes = tuple(range(1, w.ndim))
    # SCALE_RTOL: torch and numpy may sum |w| in a different order (a few float64 roundings).
    np.testing.assert_allclose(
        scale.numpy(), np.abs(w).mean(axis=axes, keepdims=True), rtol=SCALE_RTOL, atol=0
    )
    # gradient of the sign part: clipped straight-through; the detached scale contributes nothing
    # but its factor in the chain rule (the same float64 product on both sides: exact)
    g = np.random.default_rng(seed).normal(size=w.shape)
    (sw * scale).backward(torch.from_numpy(g))
    np.testing.assert_array_equal(wt.grad.numpy(), _ste_grad_oracle(w, g * scale.numpy()))


def test_magnitude_aware_sign_rejects_vectors():
    with pytest.raises(ValueError):
        magnitude_aware_sign(torch.ones(3))
