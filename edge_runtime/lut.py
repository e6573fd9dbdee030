"""Convolutions of the 0/1 diffusion state through a table, bit-identical to onnxruntime's.

The refiner's stem convolves ``y_t`` (one channel, 3 x 3) at every step, at full resolution.
``y_t`` holds exact 0.0 / 1.0, so each output pixel's value depends only on which of its
``kh * kw`` taps are 1: a ``2^(kh kw)``-row table indexed by that pattern (512 rows of ``C``
floats for 3 x 3) replaces the multiplies (the issue's "9-bit index into a per-channel table").
The rows are the node's own output, computed by onnxruntime on one small image per pattern, so
the table holds ORT's rounding whatever order MLAS sums in, as long as ORT computes a pixel the
same way wherever it lies. :meth:`LutConv.build` checks that once per node: a random 0/1 map
with borders and runs of zeros and ones through ORT and through the table, bit for bit; a node
that fails stays in ORT. At run time a map that is not exactly 0/1 (bit patterns of +0.0 and
1.0 only) goes through the node's own ORT session.

Measured on the ``cpu-base`` step (256 x 256, 32 channels, two such convolutions): 1.85 ms in
onnxruntime (with the layout reorders of their outputs) against about 0.5 ms here.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import _packed
from .graph import DYNAMIC_INPUT

__all__ = ["LutConv"]

MAX_TAPS = 9  # 512-row tables; a 4 x 4 kernel would need 65,536 rows


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class LutConv:
    """A ``Conv`` of ``y_t`` run as table lookups (module docstring); call with NCHW ``y``
    (N, 1, H, W), get NHWC float32 (N, Ho, Wo, C)."""

    def __init__(self, table: np.ndarray, kernel: tuple[int, int], pads: tuple[int, int],
                 session) -> None:
        self.table = table
        self.kernel = kernel
        self.pads = pads
        self._session = session

    @classmethod
    def build(cls, node, consts: dict[str, np.ndarray]) -> LutConv | None:
        """The table form of ``node``, or None when it does not apply or ORT disagrees."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or (
                node.input[0] != DYNAMIC_INPUT) or len(node.input) not in (2, 3):
            return None
        if any(name not in consts for name in node.input[1:] if name):
            return None
        w = consts[node.input[1]]
        attrs = _attrs(node)
        if w.dtype != np.float32 or w.ndim != 4 or w.shape[1] != 1:
            return None
        kh, kw = (int(k) for k in w.shape[2:])
        pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
        if (kh * kw > MAX_TAPS or attrs.get("group", 1) != 1
                or list(attrs.get("strides", [1, 1])) != [1, 1]
                or list(attrs.get("dilations", [1, 1])) != [1, 1]
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or pads[:2] != pads[2:] or not (0 <= pads[0] < kh and 0 <= pads[1] < kw)):
            return None
        from .ortutil import make_session

        session = make_session(_single_conv(node, consts, w.shape[0]))
        taps = kh * kw
        patterns = ((np.arange(2 ** taps)[:, None] >> np.arange(taps)) & 1).astype(np.float32)
        out = session.run(None, {DYNAMIC_INPUT: patterns.reshape(-1, 1, kh, kw)})[0]
        table = np.ascontiguousarray(out[:, :, pads[0], pads[1]])  # every tap inside
        lut = cls(table, (kh, kw), (pads[0], pads[1]), session)
        return lut if lut._agrees_with_onnxruntime() else None

    def _agrees_with_onnxruntime(self) -> bool:
        rng = np.random.default_rng(0)
        y = (rng.random((2, 1, 37, 135)) < 0.5).astype(np.float32)  # wide rows too
        y[0, 0, 3:9] = 1.0  # runs of ones and zeros, to the borders
        y[1, 0, :, 4:10] = 0.0
        want = self._session.run(None, {DYNAMIC_INPUT: y})[0].transpose(0, 2, 3, 1)
        got = self._lookup(y)
        return got is not None and got.shape == want.shape and np.array_equal(got.view(np.uint32),
                                                          want.view(np.uint32))

    def output_shape(self, y_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """NHWC shape of the result for NCHW ``y`` of ``y_shape``."""
        (kh, kw), (ph, pw) = self.kernel, self.pads
        n, _, h, w = y_shape
        return n, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1, self.table.shape[1]

    def chain(self, y: np.ndarray, ops: bytes = b"", operands: tuple = (),
              out: np.ndarray | None = None, *, threads: int = 1,
              sub: tuple[LutConv, bytes, tuple] | None = None, **pack) -> np.ndarray | None:
        """The lookup followed by ``_packed.ew_chain`` ops (and its ``pack_sub`` / ``words``)
        in the same pass; None unless ``y`` (N, 1, H, W) is exactly 0/1.

        ``sub``: ``(other, ops, operands)``, a second lookup of the same ``y`` through
        ``other`` (same kernel, padding and channels) followed by its own ops, computed in the
        same pass: its value is the operand of the ops whose operand is None (never stored)."""
        (kh, kw), (ph, pw) = self.kernel, self.pads
        y = np.ascontiguousarray(y.reshape(y.shape[0], *y.shape[2:]))
        if sub is not None:
            other, sub_ops, sub_operands = sub
            if not self.shares_rows(other):
                raise ValueError("sub needs a table of the same kernel, padding and channels")
            pack["sub"] = (other.table, sub_ops, tuple(sub_operands))
        return _packed.ew_chain(y, ops, operands, out, self.table, (kh, kw, ph, pw),
                                threads=threads, **pack)

    def shares_rows(self, other: LutConv) -> bool:
        """Whether ``other`` looks up the same rows (kernel, padding) into as many channels."""
        return (self.kernel == other.kernel and self.pads == other.pads
                and self.table.shape == other.table.shape)

    def _lookup(self, y: np.ndarray, threads: int = 1) -> np.ndarray | None:
        return self.chain(y, threads=threads)

    def __call__(self, y: np.ndarray, *, threads: int = 1) -> np.ndarray:
        y = np.asarray(y)
        if y.dtype == np.float32 and y.ndim == 4 and y.shape[1] == 1:
            out = self._lookup(y, threads)  # None unless y is exactly 0/1
            if out is not None:
                return out
        out = self._session.run(None, {DYNAMIC_INPUT: np.asarray(y, np.float32)})[0]
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def _single_conv(node, consts: dict[str, np.ndarray], cout: int) -> onnx.ModelProto:
    inits = [helper.make_tensor(name, TensorProto.FLOAT, consts[name].shape,
                                consts[name].ravel().tolist())
             for name in node.input[1:] if name]
    graph = helper.make_graph(
        [node], "lut_conv",
        [helper.make_tensor_value_info(DYNAMIC_INPUT, TensorProto.FLOAT, [None, 1, None, None])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT,
                                       [None, cout, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
