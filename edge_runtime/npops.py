"""NumPy kernels for the ONNX ops the packed backend runs outside onnxruntime.

Only ops whose result NumPy reproduces bit for bit are here: IEEE-754 single operations
(``Add``, ``Sub``, ``Mul``, ``Div``, ``PRelu``, comparisons), data movement (``Concat``,
``Reshape``, ``Transpose``, ``Slice``, ``Gather``, ...) and the small integer shape arithmetic
around ``Shape``. Everything with a rounding order of its own (convolutions, normalisation,
pooling, ``Sigmoid``, reductions, matmuls) stays in onnxruntime, and so does ``Resize`` (ORT's
nearest-neighbour copy is several times faster).

:func:`kernel` returns ``fn(*inputs) -> tuple of outputs`` for a node, or ``None`` when the node
(op, attributes or constant inputs) is not supported here; ``consts`` holds the values known at
plan time (initializers, ``Constant`` outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

__all__ = ["constant_value", "kernel"]

Kernel = Callable[..., tuple[np.ndarray, ...]]


def _attrs(node) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constant_value(node) -> np.ndarray:
    """The value of a ``Constant`` node."""
    attrs = _attrs(node)
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    raise ValueError(f"unsupported Constant attributes {sorted(attrs)}")


def _binary(ufunc) -> Kernel:
    return lambda a, b: (np.asarray(ufunc(a, b)),)


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(np.asarray(a).dtype, np.integer):
        q = np.floor_divide(a, b)
        fix = (np.remainder(a, b) != 0) & ((np.asarray(a) < 0) ^ (np.asarray(b) < 0))
        return np.asarray(q + fix.astype(q.dtype))
    return np.asarray(np.divide(a, b))


def _prelu(x: np.ndarray, slope: np.ndarray) -> tuple[np.ndarray]:
    if x.dtype == np.float32 and np.all((slope >= 0) & (slope <= 1)):
        # for 0 <= slope <= 1: x * slope >= x when x < 0, <= x when x >= 0 (rounding is
        # monotonic), so max(x, x * slope) is exactly "x < 0 ? x * slope : x".
        return (np.maximum(x, x * slope),)
    return (np.where(x < 0, x * slope, x).astype(x.dtype, copy=False),)


def _shape(start: int, end: int | None) -> Kernel:
    return lambda x: (np.asarray(x.shape[start:end], dtype=np.int64),)


def _unsqueeze(x: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray]:
    rank = x.ndim + len(axes)
    shape = list(x.shape)
    for a in sorted(int(v) % rank for v in axes):
        shape.insert(a, 1)
    return (x.reshape(shape),)


def _squeeze(x: np.ndarray, axes: np.ndarray | None = None) -> tuple[np.ndarray]:
    if axes is None:
        return (np.squeeze(x),)
    return (np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes)),)


def _reshape(allowzero: int) -> Kernel:
    def run(x: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray]:
        target = [int(s) for s in shape]
        if not allowzero:
            target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
        return (x.reshape(target),)
    return run


def _slice(x, starts, ends, axes=None, steps=None) -> tuple[np.ndarray]:
    index = [slice(None)] * x.ndim
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[int(a) % x.ndim] = slice(int(s), int(e), int(st))
    return (x[tuple(index)],)


def _cast(to: int) -> Kernel:
    dtype = helper.tensor_dtype_to_np_dtype(to)
    return lambda x: (np.asarray(x).astype(dtype),)


def _where(c, a, b) -> tuple[np.ndarray]:
    return (np.where(c, a, b),)


def _concat(axis: int) -> Kernel:
    return lambda *xs: (np.concatenate(xs, axis=axis),)


def _transpose(perm) -> Kernel:
    return lambda x: (np.ascontiguousarray(np.transpose(x, perm)),)


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Less": np.less,
    "Greater": np.greater, "Equal": np.equal, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
}
_UNARY = {"Neg": np.negative, "Abs": np.abs, "Not": np.logical_not,
          "Relu": lambda x: np.maximum(x, np.zeros((), x.dtype))}


def kernel(node, consts: list[np.ndarray | None]) -> Kernel | None:  # noqa: PLR0911, C901
    """A NumPy kernel for ``node`` (see the module docstring) or None when unsupported."""
    op, attrs = node.op_type, _attrs(node)
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in _BINARY:
        return _binary(_BINARY[op])
    if op == "Div":
        return lambda a, b: (_int_div(a, b),)
    if op in _UNARY:
        fn = _UNARY[op]
        return lambda x: (np.asarray(fn(x)),)
    if op == "PRelu":
        return _prelu
    if op == "Identity":
        return lambda x: (x,)
    if op == "Shape":
        return _shape(attrs.get("start", 0), attrs.get("end"))
    if op == "Gather":
        axis = attrs.get("axis", 0)
        return lambda x, i: (np.asarray(np.take(x, i, axis=axis)),)
    if op == "Unsqueeze" and "axes" not in attrs:
        return _unsqueeze
    if op == "Squeeze" and "axes" not in attrs:
        return _squeeze
    if op == "Concat":
        return _concat(attrs["axis"])
    if op == "Reshape":
        return _reshape(attrs.get("allowzero", 0))
    if op == "Transpose" and "perm" in attrs:
        return _transpose(list(attrs["perm"]))
    if op == "Slice":
        return _slice
    if op == "Cast":
        return _cast(attrs["to"])
    if op == "Where":
        return _where
    if op == "ConstantOfShape":
        value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1)
        return lambda shape: (np.full([int(s) for s in shape], value.reshape(()),
                                      dtype=value.dtype),)
    if op == "Range":
        return lambda a, b, d: (np.arange(a, b, d).astype(np.asarray(a).dtype),)
    if op == "Expand":
        return lambda x, shape: (np.array(np.broadcast_to(
            x, np.broadcast_shapes(x.shape, tuple(int(s) for s in shape)))),)
    return None
