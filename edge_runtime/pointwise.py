"""1 x 1 convolutions of the packed region in NHWC, bit-identical to onnxruntime's.

The refiner's real-valued convolutions inside the step are pointwise (the folded batch norms,
the down blocks' shortcuts, the decoders' fuse convolutions, split around their upsampling by
:mod:`edge_runtime.rewrite`). In onnxruntime each one costs layout reorders of its NHWC input
and output besides the multiply-adds (on the ``cpu-base`` step, 256 x 256 x 32: 2.3 ms with
the reorders, 1.2 ms natively).

``_packed.pointwise`` computes every output as ``fma`` over the input channels in order from
0, then ``+ bias``: the float32 operations of MLAS's blocked (NCHWc) pointwise kernel.
:meth:`PointwiseConv.build` checks that once per node (random values of mixed magnitudes
through the node in onnxruntime and natively, bit for bit) and only where the default kernel
path has a vector kernel (``avx512`` or ``avx2``); elsewhere the node stays in onnxruntime.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from . import _packed

__all__ = ["PointwiseConv"]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _lanes() -> int | None:
    """Output channels per vector of the native kernel on the default kernel path
    (:func:`edge_runtime.packed.set_path`), None without a vector kernel (``portable``)."""
    return {"avx512": 16, "avx2": 8}.get(_packed.current_path())


class PointwiseConv:
    """A 1 x 1 ``Conv`` run natively on NHWC float32 (module docstring). Output channels are
    padded with zero weights to whole vectors (each channel is computed on its own, so the
    padding changes nothing) and the padding is cut off the result."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, lanes: int = 1) -> None:
        cout, cin = weight.shape[:2]
        self.out_channels = cout
        padded = -(-cout // lanes) * lanes
        self.weight = np.zeros((cin, padded), np.float32)  # (Cin, Cout padded)
        self.weight[:, :cout] = weight.reshape(cout, cin).T
        self.bias = None
        if bias is not None:
            self.bias = np.zeros(padded, np.float32)
            self.bias[:cout] = bias

    @classmethod
    def build(cls, node, consts: dict[str, np.ndarray]) -> PointwiseConv | None:
        """The native form of ``node``, or None when it does not apply or ORT disagrees."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not (
                2 <= len(node.input) <= 3):
            return None
        names = [n for n in node.input[1:] if n]
        if any(n not in consts for n in names):
            return None
        w = consts[node.input[1]]
        b = consts[node.input[2]] if len(node.input) == 3 and node.input[2] else None
        attrs = _attrs(node)
        if (w.dtype != np.float32 or w.ndim != 4 or w.shape[2:] != (1, 1)
                or attrs.get("group", 1) != 1 or any(attrs.get("pads", [0, 0, 0, 0]))
                or list(attrs.get("strides", [1, 1])) != [1, 1]
                or list(attrs.get("dilations", [1, 1])) != [1, 1]
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or (b is not None and (b.dtype != np.float32 or b.shape != (w.shape[0],)))
                or _lanes() is None):
            return None
        conv = cls(w, b, _lanes())
        return conv if conv._agrees_with_onnxruntime(node, consts) else None

    def _agrees_with_onnxruntime(self, node, consts: dict[str, np.ndarray]) -> bool:
        from .ortutil import make_session

        cin, cout = self.weight.shape[0], self.out_channels
        inits = [helper.make_tensor(n, TensorProto.FLOAT, consts[n].shape,
                                    consts[n].ravel().tolist()) for n in node.input[1:] if n]
        graph = helper.make_graph(
            [node], "pointwise_probe",
            [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT,
                                           [None, cin, None, None])],
            [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT,
                                           [None, cout, None, None])], inits)
        session = make_session(helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
        rng = np.random.default_rng(0)
        shape = (2, cin, 19, 37)
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape)).astype(np.float32)
        x[0, :, :2] = 0.0
        want = session.run(None, {node.input[0]: x})[0].transpose(0, 2, 3, 1)
        got = self(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        return np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32))

    def __call__(self, x: np.ndarray, *, threads: int = 1) -> np.ndarray:
        """The convolution of NHWC float32 ``x`` (N, H, W, Cin), NHWC (N, H, W, Cout); with
        output channels padded to whole vectors, a view of the first Cout of the kernel's
        result (the head's taps: :mod:`edge_runtime.shifted` reads them in place; other readers
        make it contiguous)."""
        y = _packed.pointwise(np.ascontiguousarray(x, dtype=np.float32), self.weight, self.bias,
                              threads=threads)
        return y if y.shape[3] == self.out_channels else y[..., :self.out_channels]

