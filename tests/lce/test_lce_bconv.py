"""One binary conv as the exporter emits it (LceQuantize -> [PAD] -> LceBconv2d) in LCE's
interpreter against ``reference.binary_conv2d``.

Padding as our layers do it: 3x3 kernels with padding 1 on all sides (PyTorch style; at stride 2
that is NOT TensorFlow's SAME, the exporter pads the packed words explicitly), 1x1 with none.
Channel counts around the 32-bit word size; inputs with exact zeros (sign(0) = +1).

* ``multiplier = 1, bias = 0``: LCE's output is the integer ``conv(pad(sign(x)), W)`` exactly.
* per-channel multiplier and bias: LCE folds the back-transformation into them
  (``(2 popcount) * (-m) + (b + K m)``), which rounds differently from ``int * m + b``:
  within ``BCONV_ULPS`` float32 ulps of ``K |m| + |b|`` per channel.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference

#: tolerance of the multiplier/bias part, in float32 ulps of K|m| + |b| (see the module doc)
BCONV_ULPS = 8
KERNELS = ("indirect_bgemm", "optimized", "reference")


def _run(lce_backend, data: bytes, x: np.ndarray, kernel: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bconv.tflite"
        path.write_bytes(data)
        step = lce_backend.LceRefinerStep(path, kernel=kernel, xnnpack=False)
        return step({"x": x})


def _case(draw_seed: int, n, cin, cout, k, h, w, zero_fraction):
    rng = np.random.default_rng(draw_seed)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    x[rng.random(x.shape) < zero_fraction] = 0.0
    weight = np.where(rng.random((cout, cin, k, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    scale = rng.uniform(0.01, 2.0, cout).astype(np.float32) * rng.choice([-1, 1], cout)
    bias = rng.standard_normal(cout).astype(np.float32)
    return x, weight, scale.astype(np.float32), bias


layer = st.fixed_dictionaries({
    "n": st.sampled_from([1, 2]),
    "cin": st.sampled_from([1, 31, 33, 65]),
    "cout": st.sampled_from([1, 31, 33, 65]),
    "k": st.sampled_from([1, 3]),
    "stride": st.sampled_from([1, 2]),
    "h": st.integers(3, 9),
    "w": st.integers(3, 9),
    "pad_value": st.sampled_from([1.0, 0.0]),
    "zero_fraction": st.sampled_from([0.0, 0.3, 1.0]),
    "seed": st.integers(0, 2**32 - 1),
    "kernel": st.sampled_from(KERNELS),
})


@settings(max_examples=100, deadline=None)
@given(case=layer)
def test_bconv_matches_reference(lce, lce_export, lce_backend, case):
    c = case
    pad = c["k"] // 2
    same = lce_export.binary_ops.matches_same((c["h"], c["w"]), (c["k"],) * 2,
                                              (c["stride"],) * 2, (1, 1), (pad,) * 4)
    if c["kernel"] == "reference" and c["pad_value"] == 0.0 and pad and same and c["cin"] % 2:
        c = {**c, "kernel": "optimized"}  # LCE: its reference kernel zero-pads even C_in only
    x, weight, scale, bias = _case(c["seed"], c["n"], c["cin"], c["cout"], c["k"], c["h"],
                                   c["w"], c["zero_fraction"])
    opts = dict(strides=(c["stride"],) * 2, pads=(pad,) * 4, pad_value=c["pad_value"])
    exact = reference.binary_conv2d(x, weight, stride=c["stride"], padding=pad,
                                    pad_value=c["pad_value"])
    ones, zeros = np.ones(c["cout"], np.float32), np.zeros(c["cout"], np.float32)
    data = lce_export.binary_ops.binary_conv_model(x.shape, weight, ones, zeros, **opts)
    got = _run(lce_backend, data, x, c["kernel"])
    np.testing.assert_array_equal(got, exact)

    data = lce_export.binary_ops.binary_conv_model(x.shape, weight, scale, bias, **opts)
    got = _run(lce_backend, data, x, c["kernel"])
    want = exact * scale[None, :, None, None] + bias[None, :, None, None]
    k_total = c["k"] * c["k"] * c["cin"]
    tol = BCONV_ULPS * np.finfo(np.float32).eps * (k_total * np.abs(scale) + np.abs(bias))
    assert np.all(np.abs(got - want) <= tol[None, :, None, None])


def test_bconv_negative_zero_with_canonical_zero(lce, lce_export, lce_backend):
    """-0.0 binarizes to +1 (our sign) with ``canonical_zero`` on any packer."""
    x = np.full((1, 33, 4, 4), -0.0, np.float32)
    x[0, :5] = -1.0
    weight = np.ones((3, 33, 3, 3), np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    data = lce_export.binary_ops.binary_conv_model(x.shape, weight, ones, zeros, pads=(1,) * 4,
                                                   canonical_zero=True)
    got = _run(lce_backend, data, x, "optimized")
    np.testing.assert_array_equal(got, reference.binary_conv2d(x, weight, padding=1))


@pytest.mark.parametrize("stride,pads,want", [
    (1, (1, 1, 1, 1), "SAME"),      # stride 1, k // 2 padding: TF SAME is symmetric
    (2, (1, 1, 1, 1), "PAD"),       # stride 2: SAME would pad bottom/right only
    (1, (0, 0, 0, 0), "VALID"),
])
def test_padding_choice(lce_export, stride, pads, want):
    bo = lce_export.binary_ops
    same = bo.matches_same((8, 8), (3, 3), (stride,) * 2, (1, 1), pads)
    assert ("SAME" if same else ("VALID" if not any(pads) else "PAD")) == want
    assert bo.same_padding(8, 3, 2, 1) == (4, 0, 1)  # TF: the odd row goes bottom
