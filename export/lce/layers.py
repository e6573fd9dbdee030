"""Layer ops of the translation: convolutions (binary and float), pooling, resize, softmax,
reductions, batch norm. Each takes the ``Translator`` first (see :mod:`export.lce.translate`).
"""

from __future__ import annotations

import math

import numpy as np

from .analyze import TranslationError
from .binary_ops import binary_conv, matches_same
from .layout import NCHW_TO_NHWC, Value, storage_shape

__all__ = ["HANDLERS"]

_REDUCE = {"ReduceMax": "REDUCE_MAX", "ReduceSum": "SUM", "ReduceMean": "MEAN"}


def batch_norm(t, node, attrs) -> None:
    """Inference batch norm as a per-channel MUL and ADD."""
    x, scale, bias, mean, var = node.input[:5]
    c = {n: np.asarray(t.f.consts[n], np.float32) for n in (scale, bias, mean, var)}
    # float32 in onnxruntime's order: k = scale / sqrt(var + eps), shift = bias - mean * k
    eps = np.float32(attrs.get("epsilon", 1e-5))
    k = (np.float32(1.0) / np.sqrt(c[var] + eps)) * c[scale]
    shift = c[bias] - c[mean] * k
    v = t.vals[x]
    shape = [1] * v.rank
    shape[1] = -1
    mul = t.const(f"{node.output[0]}/bn_scale", k.reshape(shape), v.perm)
    add = t.const(f"{node.output[0]}/bn_shift", shift.reshape(shape), v.perm)
    tmp = t.b.tensor(f"{node.output[0]}/scaled", v.stored, "float32")
    t.emit_raw("MUL", [v.index, mul], tmp)
    t.emit("ADD", [tmp, add], node.output[0], v.perm)


def conv(t, node, attrs) -> None:
    """Float Conv (group 1) as CONV_2D on NHWC, OHWI filters."""
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET",):
        raise TranslationError("only Conv with group=1 and explicit pads is supported")
    w = np.asarray(t.f.consts[node.input[1]], np.float32)
    bias = (
        t.f.consts[node.input[2]]
        if len(node.input) > 2 and node.input[2]
        else np.zeros(w.shape[0], np.float32)
    )
    strides = attrs.get("strides", [1, 1])
    dil = attrs.get("dilations", [1, 1])
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    src, padding = _conv_padding(t, node.input[0], node.output[0], w.shape[2:], strides, dil, pads)
    t.emit(
        "CONV_2D",
        [
            src,
            t.const(node.input[1], w.transpose(0, 2, 3, 1)),
            t.const(f"{node.output[0]}/bias", bias),
        ],
        node.output[0],
        NCHW_TO_NHWC,
        padding=padding,
        stride_h=strides[0],
        stride_w=strides[1],
        dilation_h_factor=dil[0],
        dilation_w_factor=dil[1],
    )


def _conv_padding(t, src: str, name, kernel, strides, dil, pads) -> tuple[int, int]:
    """(input tensor, TFLite padding) realising ONNX ``pads`` exactly (zero padding)."""
    x = t.vals[src]
    index = t.get(src, NCHW_TO_NHWC)
    _, _, h, w = x.shape
    if not any(pads):
        return index, 1
    if matches_same((h, w), kernel, strides, dil, pads):
        return index, 0
    top, left, bottom, right = pads
    out = t.b.tensor(
        f"{name}/padded", (x.shape[0], h + top + bottom, w + left + right, x.shape[1]), "float32"
    )
    paddings = np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32)
    t.emit_raw("PAD", [index, t.const("paddings", paddings)], out)
    return out, 1


def average_pool(t, node, attrs) -> None:
    """AveragePool without padding as AVERAGE_POOL_2D (VALID)."""
    if any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0):
        raise TranslationError("AveragePool with padding or ceil_mode is not supported")
    k, s = attrs["kernel_shape"], attrs.get("strides", [1, 1])
    t.emit(
        "AVERAGE_POOL_2D",
        [t.get(node.input[0], NCHW_TO_NHWC)],
        node.output[0],
        NCHW_TO_NHWC,
        padding=1,
        stride_h=s[0],
        stride_w=s[1],
        filter_height=k[0],
        filter_width=k[1],
    )


def resize(t, node, attrs) -> None:
    """Nearest up-sampling by integer factors (asymmetric, floor) as RESIZE_NEAREST_NEIGHBOR
    (no half-pixel centres: source index floor(i / factor), as ONNX)."""
    mode = attrs.get("mode", b"nearest")
    coord = attrs.get("coordinate_transformation_mode", b"half_pixel")
    if (
        mode != b"nearest"
        or coord != b"asymmetric"
        or attrs.get("nearest_mode", b"round_prefer_floor") != b"floor"
    ):
        raise TranslationError("only Resize nearest/asymmetric/floor is supported")
    x = t.vals[node.input[0]]
    out_shape = t.f.shapes[node.output[0]]
    if out_shape[:2] != x.shape[:2] or any(
        o % i for o, i in zip(out_shape[2:], x.shape[2:], strict=True)
    ):
        raise TranslationError("Resize must up-sample H and W by integer factors")
    size = t.const("resize_size", np.array(out_shape[2:], np.int32))
    t.emit(
        "RESIZE_NEAREST_NEIGHBOR",
        [t.get(node.input[0], NCHW_TO_NHWC), size],
        node.output[0],
        NCHW_TO_NHWC,
    )


def softmax(t, node, attrs) -> None:
    """SOFTMAX over the storage's last axis (a transpose first if ``axis`` is not last there)."""
    v = t.vals[node.input[0]]
    axis = attrs.get("axis", -1) % v.rank
    perm = v.perm if v.perm[-1] == axis else tuple(a for a in range(v.rank) if a != axis) + (axis,)
    t.emit("SOFTMAX", [t.get(node.input[0], perm)], node.output[0], perm, beta=1.0)


def reduce(t, node, attrs) -> None:
    """ReduceMax/Sum/Mean as REDUCE_MAX/SUM/MEAN over the stored axes."""
    v = t.vals[node.input[0]]
    if len(node.input) > 1 and node.input[1]:
        axes = t.f.consts[node.input[1]]
    else:
        axes = attrs.get("axes", range(v.rank))
    axes = sorted({int(a) % v.rank for a in axes})
    keep = bool(attrs.get("keepdims", 1))
    perm = v.perm if keep else tuple(p - sum(a < p for a in axes) for p in v.perm if p not in axes)
    stored_axes = np.array([v.perm.index(a) for a in axes], np.int32)
    t.emit(
        _REDUCE[node.op_type],
        [v.index, t.const("axes", stored_axes)],
        node.output[0],
        perm,
        keep_dims=keep,
    )


def global_average_pool(t, node, attrs) -> None:
    """GlobalAveragePool as MEAN over H, W (NHWC)."""
    x = t.get(node.input[0], NCHW_TO_NHWC)
    t.emit(
        "MEAN",
        [x, t.const("axes", np.array([1, 2], np.int32))],
        node.output[0],
        NCHW_TO_NHWC,
        keep_dims=True,
    )


def binary_conv_node(t, node, attrs) -> None:
    """``ai.hidiff::BinaryConv``: shared LceQuantize, then :func:`binary_ops.binary_conv`."""
    x = t.get(node.input[0], NCHW_TO_NHWC)
    c = t.f.consts
    packed = t.quantize(x, node.input[0])
    out = binary_conv(
        t.b,
        packed,
        int(attrs["channels_in"]),
        c[node.input[1]],
        c[node.input[2]],
        c[node.input[3]],
        strides=attrs["strides"],
        dilations=attrs["dilations"],
        pads=attrs["pads"],
        pad_value=float(attrs["pad_value"]),
        name=node.output[0],
    )
    shape = t.f.shapes[node.output[0]]
    if t.b.shape(out) != storage_shape(shape, NCHW_TO_NHWC):
        raise TranslationError(f"{node.name}: binary conv output shape mismatch")
    t.vals[node.output[0]] = Value(out, shape, NCHW_TO_NHWC, "float32")


def binary_linear_node(t, node, attrs) -> None:
    """``ai.hidiff::BinaryLinear``: LceQuantize over the last axis, rows as a (1, 1, M, C)
    image, 1x1 LceBconv2d, reshape back."""
    v = t.vals[node.input[0]]
    perm = v.perm if v.perm[-1] == v.rank - 1 else tuple(range(v.rank))
    x = t.get(node.input[0], perm)
    c = t.f.consts
    w = np.asarray(c[node.input[1]], np.float32)
    stored = storage_shape(v.shape, perm)
    rows = math.prod(stored[:-1])
    packed = t.quantize(x, node.input[0])
    flat = t.b.tensor(f"{node.output[0]}/packed_4d", (1, 1, rows, t.b.shape(packed)[-1]), "int32")
    t.emit_raw("RESHAPE", [packed, t._shape_const(t.b.shape(flat))], flat)
    y = binary_conv(
        t.b,
        flat,
        w.shape[1],
        w[:, :, None, None],
        c[node.input[2]],
        c[node.input[3]],
        strides=(1, 1),
        dilations=(1, 1),
        pads=(0, 0, 0, 0),
        pad_value=1.0,
        name=node.output[0],
    )
    out_shape = t.f.shapes[node.output[0]]
    t.emit("RESHAPE", [y, t._shape_const(storage_shape(out_shape, perm))], node.output[0], perm)


HANDLERS = {
    "BatchNormalization": batch_norm,
    "Conv": conv,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "Resize": resize,
    "Softmax": softmax,
    "ReduceMax": reduce,
    "ReduceSum": reduce,
    "ReduceMean": reduce,
    "BinaryConv": binary_conv_node,
    "BinaryLinear": binary_linear_node,
}
