"""The refiner head's shifted sum, natively: ``Pad -> Slice x K -> Sum`` as one pass.

:mod:`edge_runtime.rewrite` (``narrow_conv``) turns the head's 3 x 3 convolution to one channel
into a 1 x 1 convolution to one channel per tap (native, :mod:`edge_runtime.pointwise`), a zero
``Pad``, one ``Slice`` per tap (channel ``c``, the window shifted by ``(dy, dx)``) and a ``Sum``
of the windows and the bias. In onnxruntime that is a piece of its own per step, 0.6 ms at
256 x 256 of copying (the padded map, then each window) before one pass of adds. For each
output pixel the ``Sum`` adds its inputs in order, in float32:

    v = term_0;  v = v + term_1;  ...;  v = v + term_{K-1}

with a window's term ``x[i + dy - top, j + dx - left, c]`` (``+0.0`` in the padding) and a
constant's its value. :func:`fold` replaces such a group by one plan node (``ShiftedSum``,
domain ``ai.hidiff.edge``) that :class:`ShiftedSum` runs with ``_packed.shifted_sum`` on the
NHWC map, reading each window in place. When a model loads, the group's own nodes run in
onnxruntime on a random map (zeros and negative zeros included) and the fold is kept only if
every output bit agrees.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import _packed
from .export_format import DOMAIN

__all__ = ["OP", "ShiftedSum", "fold"]

OP = "ShiftedSum"  # plan-only node (domain ai.hidiff.edge)
_BIG = np.iinfo(np.int64).max


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _resolve(i: int, dim: int) -> int:
    """An ONNX Slice bound (negative from the end, clamped to ``[0, dim]``)."""
    i = int(i)
    if i < 0:
        i += dim
    return min(max(i, 0), dim)


class ShiftedSum:
    """``Sum`` of ``Slice`` windows of a zero-``Pad``-ed NCHW map, on the NHWC map.

    ``taps``: per ``Sum`` input, ``(channel, (start_y, end_y), (start_x, end_x))`` of its window
    in the padded map, or None for a constant (``values``); ``pads``: ``(top, left, bottom,
    right)``. ``nodes``: the folded nodes (for :func:`unfold` and the probe).
    """

    def __init__(self, nodes: list, taps: list, values: list[float],
                 pads: tuple[int, int, int, int], consts: dict[str, np.ndarray]) -> None:
        self.nodes = nodes
        self.taps = taps
        self.values = np.asarray(values, np.float32)
        self.pads = pads
        self._consts = consts
        self.exact = self._agrees_with_onnxruntime()
        self._consts = {}

    def _terms(self, shape: tuple[int, ...]) -> tuple[np.ndarray, int, int] | None:
        """``(terms, ho, wo)`` for the native call on NHWC ``shape``; None when the windows do
        not all have one size or one channel."""
        _, h, w, c = shape
        top, left, bottom, right = self.pads
        hp, wp = h + top + bottom, w + left + right
        rows, size = [], None
        for tap in self.taps:
            if tap is None:
                rows.append((-1, 0, 0))
                continue
            (c0, c1), (y0, y1), (x0, x1) = tap
            c0, c1 = _resolve(c0, c), _resolve(c1, c)
            y0, y1, x0, x1 = _resolve(y0, hp), _resolve(y1, hp), _resolve(x0, wp), _resolve(x1, wp)
            window = (max(y1 - y0, 0), max(x1 - x0, 0))
            if c1 - c0 != 1 or (size is not None and window != size):
                return None
            size = window
            rows.append((c0, y0, x0))
        if size is None:
            return None
        return np.asarray(rows, np.int32), size[0], size[1]

    def __call__(self, x: np.ndarray, *, threads: int = 1) -> np.ndarray:
        """The sum for NHWC float32 ``x`` (N, H, W, C), NHWC (N, Ho, Wo, 1); ``x`` may be the
        first C channels of a C-contiguous map of more (read in place)."""
        plan = self._terms(x.shape) if getattr(x, "ndim", 0) == 4 else None
        base = x.base if isinstance(x, np.ndarray) else None
        if (plan is not None and isinstance(base, np.ndarray) and x.dtype == np.float32
                and base.dtype == np.float32 and base.ndim == 4 and base.flags.c_contiguous
                and base.shape[:3] == x.shape[:3] and base.shape[3] >= x.shape[3]
                and x.strides == base.strides
                and x.__array_interface__["data"][0] == base.__array_interface__["data"][0]):
            x = base  # the terms name channels below x's count: the extra ones are not read
        x = np.ascontiguousarray(x, dtype=np.float32)
        if plan is None:
            return self._numpy(x)
        terms, ho, wo = plan
        return _packed.shifted_sum(x, terms, self.values, self.pads[0], self.pads[1], ho, wo,
                                   threads=threads)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        """The same sum by NumPy (same order), for shapes the native call does not take."""
        top, left, bottom, right = self.pads
        padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        total, shape = None, None
        for tap, value in zip(self.taps, self.values, strict=True):
            if tap is None:
                term = value  # a float32 scalar
            else:
                term = padded[tuple([slice(None)] + [slice(_clip(a), _clip(b))
                                                     for a, b in (tap[1], tap[2], tap[0])])]
                shape = term.shape
            total = term if total is None else total + term
        return np.ascontiguousarray(np.broadcast_to(total, shape), dtype=np.float32)

    def _agrees_with_onnxruntime(self) -> bool:
        from .ortutil import make_session

        pad, *slices, total = self.nodes
        names = {n for node in self.nodes for n in node.input if n in self._consts}
        channels = 1 + max(t[0][0] for t in self.taps if t is not None)
        graph = helper.make_graph(
            list(self.nodes), "shifted_sum_probe",
            [helper.make_tensor_value_info(pad.input[0], TensorProto.FLOAT,
                                           [None, channels, None, None])],
            [helper.make_tensor_value_info(total.output[0], TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.asarray(self._consts[n]), n) for n in sorted(names)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, channels, 19, 23)).astype(np.float32)
        x[0, :, :3] = 0.0
        x[1, :, :, -4:] = -0.0
        x[:, :, 7, 7] = np.float32(1e30)  # large and small magnitudes in one sum
        try:
            want = make_session(model, 1).run(None, {pad.input[0]: x})[0]
        except Exception:  # noqa: BLE001 - a group onnxruntime rejects stays in onnxruntime
            return False
        got = self(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        return got.shape == want.transpose(0, 2, 3, 1).shape and np.array_equal(
            got.view(np.uint32), np.ascontiguousarray(want.transpose(0, 2, 3, 1)).view(np.uint32))


def _clip(b: int) -> int | None:
    return None if b == _BIG else int(b)


def _const(consts: dict, name: str) -> np.ndarray | None:
    return consts.get(name) if name else None


def _window(node, consts: dict) -> tuple | None:
    """``((c0, c1), (y0, y1), (x0, x1))`` of a Slice over the channel and spatial axes."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.input) < 4:
        return None
    starts, ends, axes = (_const(consts, n) for n in node.input[1:4])
    steps = _const(consts, node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or axes is None or (
            steps is not None and np.any(np.asarray(steps) != 1)):
        return None
    axes = [int(a) + 4 if int(a) < 0 else int(a) for a in np.asarray(axes).ravel()]
    if sorted(axes) != [1, 2, 3] or len(np.asarray(starts).ravel()) != 3:
        return None
    bounds = dict(zip(axes, zip(np.asarray(starts).ravel().tolist(),
                                np.asarray(ends).ravel().tolist(), strict=True), strict=True))
    return bounds[1], bounds[2], bounds[3]


def _zero_pad(node, consts: dict) -> tuple[int, int, int, int] | None:
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    mode = _attrs(node).get("mode", b"constant")
    pads = _const(consts, node.input[1])
    value = _const(consts, node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
    if mode not in (b"constant", "constant") or pads is None or value is None or (
            np.any(np.asarray(value) != 0)) or len(node.input) > 3:
        return None
    p = [int(v) for v in np.asarray(pads).ravel()]
    if len(p) != 8 or p[0] or p[1] or p[4] or p[5] or min(p) < 0:
        return None
    return p[2], p[3], p[6], p[7]


def fold(nodes: list, consts: dict[str, np.ndarray], natives: dict) -> list:
    """``nodes`` with each exact ``Pad -> Slice x K -> Sum`` group replaced by a ``ShiftedSum``
    node (its :class:`ShiftedSum` in ``natives`` by ``id``)."""
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    replaced: dict[int, onnx.NodeProto | None] = {}
    for total in nodes:
        if total.op_type != "Sum" or total.domain not in ("", "ai.onnx") or len(total.input) < 2:
            continue
        pad, slices, taps, values = None, [], [], []
        for name in total.input:
            const = consts.get(name)
            if const is not None and np.asarray(const).size == 1:
                taps.append(None)
                values.append(float(np.asarray(const).ravel()[0]))
                continue
            node = producer.get(name)
            window = _window(node, consts) if node is not None else None
            src = producer.get(node.input[0]) if window else None
            if window is None or src is None or window[0][0] < 0 or [
                    id(u) for u in consumers.get(name, [])] != [id(total)] or (
                    list(total.input).count(name) != 1) or (pad is not None and src is not pad):
                break
            pad = src
            slices.append(node)
            taps.append(window)
            values.append(0.0)
        else:
            pads = _zero_pad(pad, consts) if pad is not None else None
            if pads is None or {id(u) for u in consumers.get(pad.output[0], [])} != {
                    id(s) for s in slices}:
                continue
            native = ShiftedSum([pad, *slices, total], taps, values, pads, consts)
            if not native.exact:
                continue
            new = helper.make_node(OP, [pad.input[0]], [total.output[0]],
                                   name=total.name or total.output[0], domain=DOMAIN + ".edge")
            natives[id(new)] = native
            replaced[id(total)] = new
            for n in (pad, *slices):
                replaced[id(n)] = None
    return [replaced.get(id(n), n) for n in nodes if replaced.get(id(n), n) is not None]

