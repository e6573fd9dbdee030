"""The binary layers as Larq Compute Engine ops: ``LceQuantize`` -> (``PAD``) -> ``LceBconv2d``.

``ai.hidiff::BinaryConv`` computes ``conv(pad(sign(X), pad_value), W) * scale + bias`` (NCHW).
In the TFLite graph (NHWC) that is:

1. ``LceQuantize``: float -> int32 words along channels (bit 1 where ``x < 0``; LCE's portable
   packer compares ``x < 0`` exactly like our ``sign``; see :data:`NEGATIVE_ZERO_NOTE`). One
   quantize per float tensor, shared by every binary layer that reads it (Q/K/V projections).
2. Padding, chosen to be exact for OUR convention (PyTorch-style explicit ``pads``):
   * ``pads`` equal to what TensorFlow's SAME gives for this input (stride 1 with ``k // 2``
     padding, for instance): ``padding=SAME`` with ``pad_values`` = the layer's pad value.
   * otherwise (stride 2 with symmetric padding: TF SAME would pad bottom/right, PyTorch pads
     top/left): an explicit builtin ``PAD`` of the *packed* int32 tensor with zeros, and
     ``padding=VALID``. A zero word is 32 bits of +1, so this is exactly ``pad(sign(x), +1)``.
     For ``pad_value == 0`` the +1 taps are then removed again: a constant per output position
     and channel, ``-scale[o] * sum_{taps in the padding} W[o, :, i, j]``, is added (one ``ADD``).
3. ``LceBconv2d`` with float output: ``(K - 2 * popcount) * post_activation_multiplier +
   post_activation_bias``, multiplier = ``scale`` (the weight scale times the folded batch norm),
   bias = ``bias``. Filters are OHWI packed to int32 words along I.

``ai.hidiff::BinaryLinear`` (``sign(X) @ W^T * scale + bias`` over the last axis) is the same
with a 1x1 kernel over ``X`` reshaped to ``(1, 1, M, C_in)``.

Numerics: the integer part is exact. LCE rewrites the float transform as ``(2 * popcount) *
(-mul) + (bias + K * mul)`` (computed in double, stored float32), so the result can differ from
``int * mul + bias`` by a few float32 ulps of the operands; with ``mul = 1, bias = 0`` it is
exact (integers below 2**24).
"""

from __future__ import annotations

import numpy as np

from reference.bitpack import bitpack

from .tflite_writer import ModelBuilder

__all__ = [
    "NEGATIVE_ZERO_NOTE",
    "QuantizeCache",
    "binary_conv",
    "binary_conv_model",
    "conv_output_size",
    "matches_same",
    "pack_filter",
    "same_padding",
]

NEGATIVE_ZERO_NOTE = (
    "LCE's aarch64 packer takes the float sign bit, so -0.0 packs as -1 there (our sign(-0.0) "
    "= +1; its portable x86 packer compares x < 0 and agrees). export_lce(..., "
    "canonical_zero=True) adds +0.0 before each LceQuantize (-0.0 + 0.0 = +0.0) for exactness "
    "on ARM at the cost of one elementwise ADD per quantized tensor."
)

SAME, VALID = 0, 1  # TFLite Padding enum


def conv_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                     dilation: int) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """TensorFlow SAME: (output size, pad before, pad after); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return out, total // 2, total - total // 2


def matches_same(hw, kernel, strides, dilations, pads) -> bool:
    top, left, bottom, right = pads
    for i, (before, after) in enumerate(((top, bottom), (left, right))):
        out, same_before, _ = same_padding(hw[i], kernel[i], strides[i], dilations[i])
        ours = conv_output_size(hw[i], kernel[i], strides[i], before, after, dilations[i])
        if out != ours or same_before != before:
            return False
    return True


def pack_filter(weight_oihw: np.ndarray) -> np.ndarray:
    """+-1 OIHW weights -> OHWI packed along I: int32 ``(O, kh, kw, ceil(I / 32))``."""
    w = np.asarray(weight_oihw)
    return bitpack(np.transpose(w, (0, 2, 3, 1)))


class QuantizeCache:
    """One ``LceQuantize`` per float tensor (optionally after ``+ 0.0``, see the note)."""

    def __init__(self, builder: ModelBuilder, canonical_zero: bool = False) -> None:
        self.b = builder
        self.canonical_zero = canonical_zero
        self.packed: dict[int, int] = {}
        self._zero: int | None = None

    def __call__(self, x: int, name: str) -> int:
        if x in self.packed:
            return self.packed[x]
        shape = self.b.shape(x)
        src = x
        if self.canonical_zero:
            if self._zero is None:
                self._zero = self.b.const("plus_zero", np.zeros((1,), np.float32))
            src = self.b.tensor(f"{name}/plus_zero", shape, "float32")
            self.b.op("ADD", [x, self._zero], [src])
        words = -(-shape[-1] // 32)
        out = self.b.tensor(f"{name}/packed", (*shape[:-1], words), "int32")
        self.b.custom("LceQuantize", [src], [out])
        self.packed[x] = out
        return out


def binary_conv(b: ModelBuilder, packed: int, channels_in: int, weight: np.ndarray,
                scale: np.ndarray, bias: np.ndarray, *, strides, dilations, pads,
                pad_value: float, name: str) -> int:
    """Emit one binary conv on the packed NHWC tensor ``packed``; returns the float NHWC output.

    ``weight`` +-1 OIHW, ``scale``/``bias`` ``(O,)``, ``pads`` [top, left, bottom, right]
    (ONNX Conv order), ``pad_value`` 1.0 or 0.0.
    """
    weight = np.asarray(weight, np.float32)
    out_ch, in_ch, kh, kw = weight.shape
    if in_ch != channels_in:
        raise ValueError(f"{name}: weight has {in_ch} input channels, expected {channels_in}")
    if pad_value not in (0.0, 1.0):
        raise ValueError(f"{name}: pad_value must be 0.0 or 1.0, got {pad_value}")
    n, h, w_, _ = b.shape(packed)
    kernel, pads = (kh, kw), [int(p) for p in pads]
    if not any(pads):
        padding, src = VALID, packed
    elif matches_same((h, w_), kernel, strides, dilations, pads):
        padding, src = SAME, packed
    else:
        top, left, bottom, right = pads
        paddings = b.const(f"{name}/paddings",
                           np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32))
        src = b.tensor(f"{name}/padded", (n, h + top + bottom, w_ + left + right,
                                          b.shape(packed)[3]), "int32")
        b.op("PAD", [packed, paddings], [src])  # zero words = +1 bits
        padding = VALID
    ho = conv_output_size(h, kh, strides[0], pads[0], pads[2], dilations[0])
    wo = conv_output_size(w_, kw, strides[1], pads[1], pads[3], dilations[1])
    filt = b.const(f"{name}/filter_packed", pack_filter(weight))
    mul = b.const(f"{name}/post_activation_multiplier", np.asarray(scale, np.float32))
    add = b.const(f"{name}/post_activation_bias", np.asarray(bias, np.float32))
    out = b.tensor(f"{name}/output", (n, ho, wo, out_ch), "float32")
    options = {
        "channels_in": int(channels_in),
        "dilation_height_factor": int(dilations[0]),
        "dilation_width_factor": int(dilations[1]),
        "fused_activation_function": 0,
        "pad_values": 1 if (padding == VALID or pad_value == 1.0) else 0,
        "padding": padding,
        "stride_height": int(strides[0]),
        "stride_width": int(strides[1]),
    }
    b.custom("LceBconv2d", [src, filt, mul, add, -1], [out], options)
    if padding == VALID and any(pads) and pad_value == 0.0:
        corr = _zero_pad_correction(weight, (h, w_), strides, dilations, pads)
        corr = -(corr * np.asarray(scale, np.float64)).astype(np.float32)
        fixed = b.tensor(f"{name}/zero_pad_corrected", (n, ho, wo, out_ch), "float32")
        b.op("ADD", [out, b.const(f"{name}/zero_pad_correction", corr[None])], [fixed])
        out = fixed
    return out


def _zero_pad_correction(weight, hw, strides, dilations, pads) -> np.ndarray:
    """``(Ho, Wo, O)``: the sum of the weights over the taps of each window that fall in the
    padding (what +1 padding adds compared with zero padding)."""
    out_ch, _, kh, kw = weight.shape
    top, left, bottom, right = pads
    h, w = hw
    mask = np.ones((h + top + bottom, w + left + right), np.float64)
    mask[top:top + h, left:left + w] = 0.0
    wsum = weight.astype(np.float64).sum(axis=1)  # (O, kh, kw)
    ho = conv_output_size(h, kh, strides[0], top, bottom, dilations[0])
    wo = conv_output_size(w, kw, strides[1], left, right, dilations[1])
    out = np.zeros((ho, wo, out_ch))
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilations[0], j * dilations[1]
            taps = mask[r0:r0 + strides[0] * (ho - 1) + 1:strides[0],
                        c0:c0 + strides[1] * (wo - 1) + 1:strides[1]]
            out += taps[:, :, None] * wsum[None, None, :, i, j]
    return out


def binary_conv_model(x_shape_nchw, weight, scale, bias, *, strides=(1, 1), dilations=(1, 1),
                      pads=(0, 0, 0, 0), pad_value: float = 1.0,
                      canonical_zero: bool = False) -> bytes:
    """A one-layer model ``x (NHWC float) -> LceQuantize -> [PAD] -> LceBconv2d -> y (NHWC)``:
    exactly what the exporter emits for one ``ai.hidiff::BinaryConv`` (used by the tests)."""
    n, c, h, w = (int(d) for d in x_shape_nchw)
    b = ModelBuilder("hidiff binary conv")
    x = b.input("x", (n, h, w, c), "float32")
    packed = QuantizeCache(b, canonical_zero)(x, "x")
    y = binary_conv(b, packed, c, weight, scale, bias, strides=tuple(strides),
                    dilations=tuple(dilations), pads=tuple(pads), pad_value=float(pad_value),
                    name="bconv")
    b.output(y)
    return b.finish()
