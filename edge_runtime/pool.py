"""2 x 2 average pooling in NHWC for the packed backend, bit-identical to onnxruntime's.

The refiner's down blocks pool their float input (``AveragePool``, kernel 2, stride 2) for the
shortcut. In onnxruntime that value is an NHWC feature map of the packed region, so the pool
cost a layout reorder of the full-resolution map besides the pooling itself (measured on the
``cpu-base`` step: 4.1 ms for the 256 x 256 x 32 pool and its neighbour, of a 29 ms step).

:func:`average_pool_2x2` computes ``((((0 + a) + b) + c) + d) * 0.25`` per output value, ``a``
.. ``d`` the window in row-major order: the float32 operations of MLAS's blocked (NCHWc) pooling
kernel, which onnxruntime uses when the channel count is a multiple of its block (16 with
AVX-512, 8 with AVX2). Its plain NCHW kernel rounds in another order. Which kernel a channel
count gets is a property of the CPU and the onnxruntime build, so :func:`matches_onnxruntime`
asks onnxruntime itself (once per channel count and process: random values of mixed magnitudes
and signed zeros, compared bit for bit); the planner runs the pool here only where it agrees.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from . import _packed

__all__ = ["average_pool_2x2", "matches_onnxruntime", "supported"]

_PROBED: dict[int, bool] = {}


def average_pool_2x2(x: np.ndarray, out: np.ndarray | None = None, *,
                     threads: int = 1) -> np.ndarray:
    """``AveragePool(kernel 2, stride 2, no padding, floor)`` of NHWC float32 ``x``, natively
    (``_packed.avg_pool2``: one pass, about 0.12 ms for 256 x 256 x 32 against 0.65 ms as four
    NumPy passes); ``threads``: output rows split over that many threads."""
    return _packed.avg_pool2(np.ascontiguousarray(x, dtype=np.float32), out, threads=threads)


def supported(node) -> bool:
    """Whether ``node`` is the ``AveragePool`` :func:`average_pool_2x2` computes."""
    if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (list(attrs.get("kernel_shape", [])) == [2, 2]
            and list(attrs.get("strides", [1, 1])) == [2, 2]
            and not any(attrs.get("pads", [0, 0, 0, 0]))
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")
            and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and not attrs.get("ceil_mode", 0))


def matches_onnxruntime(channels: int) -> bool:
    """Whether onnxruntime's 2 x 2 ``AveragePool`` over ``channels`` channels rounds as
    :func:`average_pool_2x2` does, on this CPU (see the module docstring)."""
    if channels not in _PROBED:
        from onnx import TensorProto

        from .ortutil import make_session

        graph = helper.make_graph(
            [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
            "pool_probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, None, None])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        session = make_session(helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
        rng = np.random.default_rng(0)
        shape = (2, channels, 18, 22)
        x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3], size=shape)).astype(
            np.float32)
        x[:, :, :4, :4] = -0.0  # windows of signed zeros (ORT's 0 + -0 is +0)
        x[0, 0, 4:6, 4:6] = [[1.0, 1e8], [-1e8, 1.0]]  # where the order of the sum shows
        want = session.run(None, {"x": x})[0]
        got = average_pool_2x2(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(
            0, 3, 1, 2)
        _PROBED[channels] = bool(np.array_equal(want.view(np.uint32), got.view(np.uint32)))
    return _PROBED[channels]
