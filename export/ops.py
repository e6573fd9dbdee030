"""The custom ONNX operators of the binary layers, with model-local function bodies.

Two operators in the domain ``ai.hidiff`` (version 1). Each binary layer of the refiner becomes
ONE node, so a runtime with a packed XNOR-popcount kernel can recognise and replace it, while the
model-local ONNX function attached to the file gives stock runtimes (onnxruntime,
``onnx.reference.ReferenceEvaluator``) an exact standard-op body:

``ai.hidiff::BinaryConv(X, W, scale, bias) -> Y``
    ``Y = conv(pad(sign(X), pad_value), W) * scale[o] + bias[o]``.
    X float NCHW, *not* binarized (the node binarizes it); W the +-1 weights (OIHW float, already
    binarized); scale and bias per output channel, shape ``(channels_out,)``.
    Attributes: ``kernel_shape`` [kh, kw], ``strides`` [sh, sw], ``dilations`` [dh, dw], ``pads``
    [top, left, bottom, right] (ONNX Conv order), ``pad_value`` (float, 1.0 or 0.0: the value
    the *binarized* input is padded with), ``channels_in``, ``channels_out``.
    Body: ``Less(X, 0)``/``Where(-1, +1)`` -> ``Pad(constant, pad_value)`` -> ``Conv`` (no
    padding) -> ``Mul(scale, .)`` -> ``Add(., bias)``.

``ai.hidiff::BinaryLinear(X, W, scale, bias) -> Y``
    ``Y = sign(X) @ W^T * scale + bias`` over the last axis of X (any leading axes).
    W the +-1 weights ``(channels_out, channels_in)`` (torch's Linear layout); scale and bias
    ``(channels_out,)``. Attributes: ``channels_in``, ``channels_out``.
    Body: ``Less``/``Where`` -> ``MatMul(Transpose(W))`` -> ``Mul`` -> ``Add``.

``sign`` is the project's: ``-1 if x < 0 else +1`` (sign(0) = +1, sign(NaN) = +1), never ONNX
``Sign``. The products of +-1 values sum integers, so the convolution / matmul part is exact in
float32 (|sum| <= 2**24); only ``* scale + bias`` rounds, the same two float32 operations any
runtime performs. The body writes ``Mul(scale, Y)`` with the scale FIRST: onnxruntime's Conv+Mul
fusion (basic optimisation level) only matches a constant second operand, and would otherwise
fold the scale into the +-1 weights, which rounds differently (measured: up to ~1e-5 on outputs
of ~100); with this order ORT's result equals ``reference.binary_conv2d(x, w) * scale + bias``
bit for bit at every optimisation level.

The torch side (:class:`BinaryConvFunction`, :class:`BinaryLinearFunction`) is an
``autograd.Function`` whose forward computes exactly that in torch and whose ``symbolic`` emits
the custom node for the legacy exporter (``torch.onnx.export(..., dynamo=False,
custom_opsets={"ai.hidiff": 1})``).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
import torch.nn.functional as F
from onnx import AttributeProto, TensorProto, helper
from torch import Tensor

from edge_runtime.export_format import BINARY_CONV, BINARY_LINEAR, DOMAIN, DOMAIN_VERSION

__all__ = [
    "BINARY_CONV",
    "BINARY_LINEAR",
    "DOMAIN",
    "DOMAIN_VERSION",
    "BinaryConvFunction",
    "BinaryLinearFunction",
    "binary_conv_function",
    "binary_linear_function",
    "custom_functions",
    "torch_sign",
]


_INTS = AttributeProto.INTS
_FLOAT = AttributeProto.FLOAT


def torch_sign(x: Tensor) -> Tensor:
    """``where(x < 0, -1, +1)`` (sign(0) = +1), the body's ``Less``/``Where`` in torch."""
    return torch.where(x < 0, x.new_tensor(-1.0), x.new_tensor(1.0))


def _const_float(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value])
    )


def _const_ints(name: str, values: Sequence[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        value=helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values)),
    )


def _sign_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    """``out = Where(Less(x, 0), -1, +1)``."""
    return [
        _const_float("zero", 0.0),
        _const_float("minus_one", -1.0),
        _const_float("plus_one", 1.0),
        helper.make_node("Less", [x, "zero"], ["is_negative"]),
        helper.make_node("Where", ["is_negative", "minus_one", "plus_one"], [out]),
    ]


def binary_conv_function(opset: int) -> onnx.FunctionProto:
    """The model-local function defining ``ai.hidiff::BinaryConv`` over the default ``opset``."""
    nodes = _sign_nodes("X", "X_sign")
    nodes += [
        # Conv-order pads [top, left, bottom, right] -> Pad-order [0, 0, top, left, 0, 0, ...]:
        # reshape to [[top, left], [bottom, right]], prepend two zero columns, flatten.
        _attr_constant("conv_pads", "value_ints", "pads", _INTS),
        _const_ints("two_by_two", [2, 2]),
        helper.make_node("Reshape", ["conv_pads", "two_by_two"], ["pads_2x2"]),
        _const_ints("prepend_two", [0, 2, 0, 0]),
        helper.make_node("Pad", ["pads_2x2", "prepend_two"], ["pads_2x4"]),
        _const_ints("flat", [-1]),
        helper.make_node("Reshape", ["pads_2x4", "flat"], ["pad_pads"]),
        _attr_constant("pad_value", "value_float", "pad_value", _FLOAT),
        helper.make_node("Pad", ["X_sign", "pad_pads", "pad_value"], ["X_padded"], mode="constant"),
        _attr_node(
            "Conv",
            ["X_padded", "W"],
            ["Y_int"],
            [("kernel_shape", _INTS), ("strides", _INTS), ("dilations", _INTS)],
        ),
        _const_ints("channel_axes", [1, 2]),
        helper.make_node("Unsqueeze", ["scale", "channel_axes"], ["scale_c11"]),
        helper.make_node("Unsqueeze", ["bias", "channel_axes"], ["bias_c11"]),
        helper.make_node("Mul", ["scale_c11", "Y_int"], ["Y_scaled"]),
        helper.make_node("Add", ["Y_scaled", "bias_c11"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN,
        BINARY_CONV,
        ["X", "W", "scale", "bias"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=[
            "kernel_shape", "strides", "dilations", "pads", "pad_value", "channels_in",
            "channels_out",
        ],
        doc_string=(
            "Y = conv(pad(sign(X), pad_value), W) * scale + bias; sign(x) = -1 if x < 0 else +1; "
            "W is +-1 (OIHW); scale, bias per output channel."
        ),
    )


def binary_linear_function(opset: int) -> onnx.FunctionProto:
    """The model-local function defining ``ai.hidiff::BinaryLinear`` over the default ``opset``."""
    nodes = _sign_nodes("X", "X_sign")
    nodes += [
        helper.make_node("Transpose", ["W"], ["W_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["X_sign", "W_t"], ["Y_int"]),
        helper.make_node("Mul", ["scale", "Y_int"], ["Y_scaled"]),
        helper.make_node("Add", ["Y_scaled", "bias"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN,
        BINARY_LINEAR,
        ["X", "W", "scale", "bias"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=["channels_in", "channels_out"],
        doc_string=(
            "Y = sign(X) @ W^T * scale + bias over the last axis; sign(x) = -1 if x < 0 else +1; "
            "W is +-1 (out, in); scale, bias per output."
        ),
    )


def _attr_constant(out: str, const_attr: str, ref: str, kind: int) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(helper.make_attribute_ref(const_attr, kind, ref_attr_name=ref))
    return node


def _attr_node(
    op: str, inputs: list[str], outputs: list[str], refs: list[tuple[str, int]]
) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs)
    for name, kind in refs:
        node.attribute.append(helper.make_attribute_ref(name, kind))
    return node


def custom_functions(opset: int, used: Sequence[str]) -> list[onnx.FunctionProto]:
    """The function protos for the custom ops named in ``used`` (sorted, for stable bytes)."""
    makers = {BINARY_CONV: binary_conv_function, BINARY_LINEAR: binary_linear_function}
    return [makers[name](opset) for name in sorted(set(used))]


# -- torch side ----------------------------------------------------------------------------------


class BinaryConvFunction(torch.autograd.Function):
    """``conv(pad(sign(x), pad_value), w) * scale + bias``; exported as ``ai.hidiff::BinaryConv``.

    ``pads`` in ONNX Conv order [top, left, bottom, right]. Inference only (no backward).
    """

    @staticmethod
    def forward(ctx, x, w, scale, bias, kernel_shape, strides, dilations, pads, pad_value):
        xb = torch_sign(x)
        top, left, bottom, right = pads
        if any(pads):
            xb = F.pad(xb, (left, right, top, bottom), value=float(pad_value))
        y = F.conv2d(xb, w, None, tuple(strides), 0, tuple(dilations))
        return y * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    @staticmethod
    def symbolic(g, x, w, scale, bias, kernel_shape, strides, dilations, pads, pad_value):
        out_channels, in_channels = _static_sizes(w, 2)
        out = g.op(
            f"{DOMAIN}::{BINARY_CONV}",
            x,
            w,
            scale,
            bias,
            kernel_shape_i=list(kernel_shape),
            strides_i=list(strides),
            dilations_i=list(dilations),
            pads_i=list(pads),
            pad_value_f=float(pad_value),
            channels_in_i=in_channels,
            channels_out_i=out_channels,
        )
        sizes = _sizes(x)
        if sizes is not None and len(sizes) == 4:
            spatial = [
                _conv_out(sizes[2 + i], kernel_shape[i], strides[i], pads[i], pads[2 + i],
                          dilations[i])
                for i in range(2)
            ]
            _set_type(out, x, [sizes[0], out_channels, *spatial])
        return out


class BinaryLinearFunction(torch.autograd.Function):
    """``sign(x) @ w.T * scale + bias``; exported as ``ai.hidiff::BinaryLinear``."""

    @staticmethod
    def forward(ctx, x, w, scale, bias):
        return F.linear(torch_sign(x), w) * scale + bias

    @staticmethod
    def symbolic(g, x, w, scale, bias):
        out_features, in_features = _static_sizes(w, 2)
        out = g.op(
            f"{DOMAIN}::{BINARY_LINEAR}",
            x,
            w,
            scale,
            bias,
            channels_in_i=in_features,
            channels_out_i=out_features,
        )
        sizes = _sizes(x)
        if sizes is not None and sizes:
            _set_type(out, x, [*sizes[:-1], out_features])
        return out


def _static_sizes(value, count: int) -> tuple[int, ...]:
    sizes = value.type().sizes()
    if sizes is None or len(sizes) < count or any(s is None for s in sizes[:count]):
        raise RuntimeError("binary layer weights must have static shapes at export")
    return tuple(int(s) for s in sizes[:count])


def _sizes(value) -> list[int | None] | None:
    """The (possibly partly symbolic) sizes of a traced value, or None when unknown."""
    try:
        return value.type().varyingSizes()
    except (AttributeError, RuntimeError):
        return None


def _conv_out(size, kernel, stride, pad_begin, pad_end, dilation):
    if size is None:
        return None
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def _set_type(out, like, sizes) -> None:
    """Tell the exporter the custom node's output type (float, like the input) and shape."""
    try:
        out.setType(like.type().with_sizes(sizes))
    except (AttributeError, RuntimeError, TypeError):
        pass
