"""Oracle tests for hidiff.layers against the NumPy XNOR-popcount reference (method §7).

The binary layers compute ``integer_part * s_o``: ``integer_part`` is a sum of +-1 products, exact
in float32, and must equal ``reference.binary_conv.binary_conv2d`` / ``binary_linear`` exactly.
TB and TA must equal ``reference.time_conditioning`` given the thresholds / shifts they compute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import conv_geometry

from hidiff.layers import BinaryConv2d, BinaryLinear, TimeActivation, TimeBinarization
from reference.binary_conv import binary_conv2d, binary_linear
from reference.time_conditioning import time_activation, time_binarization

#: The scaled output is one float32 multiply of an exact integer by s_o; round-to-nearest keeps it
#: within half an ulp of the exact product: |y - I * s_o| <= 2**-24 * |I * s_o|.
SCALED_RTOL = 2.0**-24
QUANTIZERS = ["approx_sign", "ste_sign", None]
_SPECIAL_W = np.array([0.0, -0.0, 1.0, -1.0, 2.5, -1.5, 1e-3, -1e-3], dtype=np.float32)


def _weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian weights with exact zeros, +-1 (the STE boundary) and |w| > 1 mixed in."""
    w = rng.normal(0.0, 0.8, size=shape).astype(np.float32)
    special = rng.random(shape) < 0.3
    w[special] = rng.choice(_SPECIAL_W, size=int(special.sum()))
    return w


def _int_inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Integers in -2..2 as float32: many exact zeros (sign(0) = +1)."""
    return rng.integers(-2, 3, size=shape).astype(np.float32)


def _pseudo_grad(name: str | None, x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    if name == "ste_sign":
        return (ax <= 1).astype(x.dtype)
    return np.where(ax < 1, 2 - 2 * ax, 0).astype(x.dtype)


@st.composite
def conv_cases(draw):
    return {
        **draw(conv_geometry(kernels=(1, 3), extra=6)),
        "n": draw(st.integers(1, 2)),
        "cin": draw(st.sampled_from([1, 31, 33, 65])),
        "cout": draw(st.sampled_from([1, 2, 33])),
        "quantizer": draw(st.sampled_from(QUANTIZERS)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _make_conv(case) -> tuple[BinaryConv2d, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    layer = BinaryConv2d(
        case["cin"],
        case["cout"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        bias=case["bias"],
        pad_value=case["pad_value"],
        input_quantizer=case["quantizer"],
    )
    w = _weights(rng, tuple(layer.weight.shape))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(rng.normal(size=case["cout"]).astype(np.float32)))
    x = _int_inputs(rng, (case["n"], case["cin"], *case["size"]))
    if case["quantizer"] is None:  # None means the caller already binarized the input
        x = np.where(x < 0, -1.0, 1.0).astype(np.float32)
    return layer, x, w


@settings(max_examples=150, deadline=None)
@given(case=conv_cases())
def test_binary_conv2d_matches_xnor_reference(case):
    layer, x, w = _make_conv(case)
    ref = binary_conv2d(
        x,
        w,
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        pad_value=case["pad_value"],
    )
    with torch.no_grad():
        y = layer(torch.from_numpy(x))
    assert y.dtype == torch.float32 and tuple(y.shape) == ref.shape
    s = layer.weight_scale()
    np.testing.assert_array_equal(layer.binarized_weight().numpy(), np.where(w < 0, -1.0, 1.0))
    np.testing.assert_allclose(s.numpy(), np.abs(w).mean(axis=(1, 2, 3)), rtol=1e-6)
    bias = 0.0 if layer.bias is None else layer.bias.detach().view(1, -1, 1, 1)
    # Exact: the integer part times s_o is the same single float32 multiply on both sides.
    expected = torch.from_numpy(ref) * s.view(1, -1, 1, 1) + bias
    assert torch.equal(y, expected)
    integer_part = (y - bias).numpy().astype(np.float64)
    positive = s.numpy() > 0
    if positive.any():
        recovered = np.round(integer_part[:, positive] / s.numpy()[None, positive, None, None])
        np.testing.assert_array_equal(recovered, ref[:, positive])
    if layer.bias is None:
        exact = ref.astype(np.float64) * s.numpy().astype(np.float64)[None, :, None, None]
        np.testing.assert_allclose(integer_part, exact, rtol=SCALED_RTOL, atol=0)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**32 - 1))
def test_binary_conv2d_gradients(quantizer, case, seed):
    """W.grad = 1[|W| <= 1] * dL/dsign(W); x.grad = pseudo'(x) * dL/dsign(x) (plain-conv oracle)."""
    case = {**case, "quantizer": quantizer, "bias": False}
    layer, _, w = _make_conv(case)
    rng = np.random.default_rng(seed)
    shape = (case["n"], case["cin"], *case["size"])
    x = rng.uniform(-1.5, 1.5, size=shape).astype(np.float32)
    special = rng.random(shape) < 0.3
    x[special] = rng.choice(np.array([0.0, 1.0, -1.0, 2.0, -0.5], dtype=np.float32), special.sum())
    if quantizer is None:
        x = np.where(x < 0, -1.0, 1.0).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)
    g = torch.from_numpy(rng.normal(size=tuple(y.shape)).astype(np.float32))
    y.backward(g)

    # Oracle: the same computation with the signs as leaves, through plain torch ops.
    xb = torch.from_numpy(np.where(x < 0, -1.0, 1.0).astype(np.float32)).requires_grad_(True)
    wb = torch.from_numpy(np.where(w < 0, -1.0, 1.0).astype(np.float32)).requires_grad_(True)
    ph, pw = case["padding"]
    xpad = F.pad(xb, (pw, pw, ph, ph), value=case["pad_value"])
    y_ref = F.conv2d(xpad, wb, None, case["stride"], 0, case["dilation"])
    y_ref = y_ref * layer.weight_scale().view(1, -1, 1, 1)
    assert torch.equal(y.detach(), y_ref.detach())
    y_ref.backward(g)

    w_grad = layer.weight.grad.numpy()
    assert np.all(w_grad[np.abs(w) > 1] == 0)
    np.testing.assert_array_equal(w_grad, np.where(np.abs(w) <= 1, wb.grad.numpy(), 0))
    x_grad_expected = (
        xb.grad.numpy() if quantizer is None else xb.grad.numpy() * _pseudo_grad(quantizer, x)
    )
    np.testing.assert_array_equal(xt.grad.numpy(), x_grad_expected)


@settings(max_examples=100, deadline=None)
@given(
    lead=st.sampled_from([(), (3,), (2, 5)]),
    fin=st.sampled_from([1, 31, 32, 33, 65]),
    fout=st.sampled_from([1, 7, 33]),
    quantizer=st.sampled_from(QUANTIZERS),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_binary_linear_matches_xnor_reference(lead, fin, fout, quantizer, bias, seed):
    rng = np.random.default_rng(seed)
    layer = BinaryLinear(fin, fout, bias, input_quantizer=quantizer)
    w = _weights(rng, (fout, fin))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        if bias:
            layer.bias.copy_(torch.from_numpy(rng.normal(size=fout).astype(np.float32)))
    x = _int_inputs(rng, (*lead, fin))
    if quantizer is None:
        x = np.where(x < 0, -1.0, 1.0).astype(np.float32)
    ref = binary_linear(x, w)
    with torch.no_grad():
        y = layer(torch.from_numpy(x))
    s = layer.weight_scale()
    np.testing.assert_array_equal(layer.binarized_weight().numpy(), np.where(w < 0, -1.0, 1.0))
    b = 0.0 if layer.bias is None else layer.bias.detach()
    assert torch.equal(y, torch.from_numpy(ref) * s + b)  # exact, as for the conv
    if not bias:
        exact = ref.astype(np.float64) * s.numpy().astype(np.float64)
        np.testing.assert_allclose(y.numpy(), exact, rtol=SCALED_RTOL, atol=0)
    xt = torch.from_numpy(x).requires_grad_(True)
    layer(xt).sum().backward()
    assert np.all(layer.weight.grad.numpy()[np.abs(w) > 1] == 0)


def _random_linear(module: torch.nn.Linear, rng: np.random.Generator) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(rng.normal(size=tuple(module.weight.shape))))
        module.bias.copy_(torch.from_numpy(rng.normal(size=tuple(module.bias.shape))))


@st.composite
def time_cases(draw):
    return {
        "n": draw(st.integers(1, 3)),
        "channels": draw(st.sampled_from([1, 3, 33])),
        "emb_dim": draw(st.integers(1, 8)),
        "spatial": draw(st.sampled_from([(), (5,), (3, 4)])),
        "emb_batch1": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _to_nc_first(x: np.ndarray) -> np.ndarray:
    """(N, L, C) tokens -> (N, C, L) for the reference; other layouts unchanged."""
    return np.swapaxes(x, 1, 2) if x.ndim == 3 else x


def _time_inputs(case, dtype, per_channel: np.ndarray, negate: bool):
    """Inputs of the case's layout, with entries set to hit the u == threshold boundary exactly."""
    rng = np.random.default_rng(case["seed"] + 1)
    n, c = case["n"], case["channels"]
    spatial = case["spatial"]
    shape = (n, c, *spatial)
    x = rng.integers(-2, 3, size=shape).astype(dtype) + rng.normal(0, 0.5, size=shape).astype(dtype)
    target = np.broadcast_to(per_channel.reshape((-1, c) + (1,) * len(spatial)), shape)
    hit = rng.random(shape) < 0.3
    x[hit] = (-target if negate else target)[hit]
    if len(spatial) == 1:  # (N, C, L) -> token layout (N, L, C), channels last
        x = np.ascontiguousarray(np.swapaxes(x, 1, 2))
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=80, deadline=None)
@given(case=time_cases())
def test_time_binarization_matches_reference(dtype, case):
    rng = np.random.default_rng(case["seed"])
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    tb = TimeBinarization(case["channels"], case["emb_dim"]).to(tdtype)
    _random_linear(tb.threshold, rng)
    emb = torch.from_numpy(
        rng.normal(size=(1 if case["emb_batch1"] else case["n"], case["emb_dim"]))
    )
    emb = emb.to(tdtype)
    with torch.no_grad():
        a = tb.thresholds(emb)
    assert tuple(a.shape) == (emb.shape[0], case["channels"])
    x = _time_inputs(case, dtype, a.numpy(), negate=False)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = tb(xt, emb)
    assert out.dtype == tdtype and out.shape == xt.shape
    a_ref = a.numpy()[0] if case["emb_batch1"] else a.numpy()
    expected = _to_nc_first(time_binarization(_to_nc_first(x), a_ref))
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    # gradient: approx_sign' of u - a (the same float subtraction as the layer's, so exact)
    g = rng.normal(size=x.shape).astype(dtype)
    out.backward(torch.from_numpy(g))
    with torch.no_grad():
        shift = a[:, :, None, None] if x.ndim == 4 else a[:, None, :] if x.ndim == 3 else a
        d = (xt - shift).numpy()
    np.testing.assert_array_equal(xt.grad.numpy(), g * _pseudo_grad("approx_sign", d))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=80, deadline=None)
@given(case=time_cases())
def test_time_activation_matches_reference(dtype, case):
    rng = np.random.default_rng(case["seed"])
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    ta = TimeActivation(case["channels"], case["emb_dim"]).to(tdtype)
    _random_linear(ta.zeta, rng)
    _random_linear(ta.gamma, rng)
    with torch.no_grad():
        ta.slope.copy_(torch.from_numpy(rng.uniform(-0.5, 1.5, size=case["channels"])))
    emb = torch.from_numpy(
        rng.normal(size=(1 if case["emb_batch1"] else case["n"], case["emb_dim"]))
    )
    emb = emb.to(tdtype)
    with torch.no_grad():
        zeta, gamma = ta.shifts(emb)
        x = _time_inputs(case, dtype, zeta.numpy(), negate=True)  # hits u + zeta == 0
        out = ta(torch.from_numpy(x), emb)
    pick = (lambda v: v.numpy()[0]) if case["emb_batch1"] else (lambda v: v.numpy())
    expected = _to_nc_first(
        time_activation(_to_nc_first(x), pick(zeta), pick(gamma), ta.slope.detach().numpy())
    )
    assert out.dtype == tdtype and tuple(out.shape) == x.shape
    if dtype == np.float64:
        # The same float64 operations in the same order: exact.
        np.testing.assert_array_equal(out.numpy(), expected)
    else:
        # float32 layer vs float64 oracle: three float32 roundings (x + zeta, slope * v, + gamma),
        # each within 2**-24 of its intermediate; bound them by the largest magnitude involved.
        mag = np.abs(x).max() + np.abs(zeta.numpy()).max() + np.abs(gamma.numpy()).max()
        mag *= max(1.0, float(np.abs(ta.slope.detach().numpy()).max()))
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=4 * 2.0**-24 * mag)


def test_time_layers_start_as_identity_shapes():
    tb, ta = TimeBinarization(4, 6), TimeActivation(4, 6)
    emb = torch.randn(2, 6)
    x = torch.tensor([-1.5, -0.0, 0.0, 2.0]).repeat(2, 1)[:, :, None, None].expand(2, 4, 3, 3)
    assert torch.equal(tb(x, emb), torch.where(x < 0, -1.0, 1.0))
    assert torch.equal(ta(x, emb), torch.where(x >= 0, x, 0.25 * x))
    assert torch.equal(ta.slope.detach(), torch.full((4,), 0.25))
    assert all(torch.count_nonzero(p) == 0 for p in (*tb.parameters(), *ta.shifts(emb)))


def test_time_layers_token_layout_equals_nchw():
    torch.manual_seed(0)
    tb, ta = TimeBinarization(5, 3), TimeActivation(5, 3)
    for lin in (tb.threshold, ta.zeta, ta.gamma):
        torch.nn.init.normal_(lin.weight)
    emb, x = torch.randn(2, 3), torch.randn(2, 5, 4, 6)
    tokens = x.flatten(2).transpose(1, 2)  # (N, L, C)
    for layer in (tb, ta):
        with torch.no_grad():
            assert torch.equal(layer(tokens, emb), layer(x, emb).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="expected"):
        tb(torch.randn(2, 5, 1, 1, 1), emb)


@pytest.mark.parametrize("pad_value", [0.5, 2.0, -1.0, True])
def test_conv_rejects_pad_value(pad_value):
    with pytest.raises(ValueError, match=r"1\.0.*0\.0"):
        BinaryConv2d(2, 2, 3, padding=1, pad_value=pad_value)


def test_conv_rejects_groups_and_padding_strings():
    with pytest.raises(ValueError, match="groups=1"):
        BinaryConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding"):
        BinaryConv2d(4, 4, 3, padding="same")


@pytest.mark.parametrize(
    "make",
    [
        lambda q: BinaryConv2d(2, 2, 1, input_quantizer=q),
        lambda q: BinaryLinear(2, 2, input_quantizer=q),
    ],
)
def test_layers_reject_unknown_quantizer(make):
    with pytest.raises(ValueError, match=r"'approx_sign', 'ste_sign', None"):
        make("sign")


def test_layer_defaults_and_repr():
    conv = BinaryConv2d(3, 4, 3, padding=1)
    assert conv.bias is None and conv.pad_value == 1.0 and conv.input_quantizer == "approx_sign"
    assert tuple(conv.weight_scale().shape) == (4,)
    text = repr(BinaryConv2d(3, 4, 3, pad_value=0.0, input_quantizer="ste_sign"))
    assert "pad_value=0.0" in text and "input_quantizer='ste_sign'" in text
    lin = BinaryLinear(3, 4)
    assert lin.bias is None and "input_quantizer='approx_sign'" in repr(lin)
    assert tuple(lin.weight_scale().shape) == (4,)
