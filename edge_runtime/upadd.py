"""The decoders' ``Add(Resize_2x(low), Conv_1x1(skip))`` as one native pass.

:mod:`edge_runtime.rewrite` (``conv_before_upsample``) splits each decoder's fuse convolution
into its low-resolution half, upsampled 2x by nearest-neighbour copies, and its skip half, a 1 x
1 convolution at full resolution, added together. Run as three steps, the full-resolution map is
written by the convolution, read again with the upsampled copy and written once more by the add
(at 256 x 256 x 32: 1.2 ms for the convolution, 0.6 ms for the upsample-add pass).
:func:`fold` replaces the three nodes by one plan node (``PointwiseUpAdd``, domain
``ai.hidiff.edge``) whose :class:`UpsampleAddConv` runs the convolution of
:mod:`edge_runtime.pointwise` (checked against onnxruntime per node when the model loads) and
adds ``low[i / 2, j / 2]`` to each result as it is stored: the ``Add`` is one float32 addition,
the same bits in either operand order, and the upsampling only chooses which ``low`` pixel.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from . import _packed, resize
from .export_format import DOMAIN
from .pointwise import PointwiseConv

__all__ = ["OP", "UpsampleAddConv", "fold"]

OP = "PointwiseUpAdd"  # plan-only node (domain ai.hidiff.edge): inputs (skip, low)


class UpsampleAddConv:
    """``Resize_2x(low) + conv(x)`` of NHWC maps; ``nodes``: the folded Resize, Conv, Add."""

    def __init__(self, conv: PointwiseConv, nodes: list) -> None:
        self.conv = conv
        self.nodes = nodes

    def __call__(self, x: np.ndarray, low: np.ndarray, *, threads: int = 1,
                 pack_sub: np.ndarray | None = None):
        """NHWC float32 ``x`` (N, H, W, Cin) and ``low`` (N, H / 2, W / 2, Cout) for an even H
        and W (the shapes the graph's Add accepts; others raise ``ValueError``). With
        ``pack_sub`` ((Cout,) or (N, Cout)) returns ``(result, words)``, the packed sign words
        of ``result - pack_sub`` too (the next binary conv's input)."""
        extra = {} if pack_sub is None else {"pack_sub": pack_sub}
        return _packed.pointwise(np.ascontiguousarray(x, dtype=np.float32), self.conv.weight,
                                 self.conv.bias, threads=threads,
                                 add_up=np.ascontiguousarray(low, dtype=np.float32), **extra)


def fold(nodes: list, consts: dict[str, np.ndarray], natives: dict) -> list:
    """``nodes`` with each ``Add(Resize_2x(low), Conv_1x1(x))`` (either operand order; the
    Resize and the Conv read by the Add alone) replaced by a ``PointwiseUpAdd`` node (its
    :class:`UpsampleAddConv` in ``natives`` by ``id``)."""
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list[int]] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(id(n))
    replaced: dict[int, object] = {}
    for add in nodes:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 or (
                add.input[0] == add.input[1]):
            continue
        parts = [producer.get(name) for name in add.input]
        if any(p is None or readers.get(p.output[0]) != [id(add)] or id(p) in replaced
               for p in parts):
            continue
        ops = [p.op_type for p in parts]
        if sorted(ops) != ["Conv", "Resize"]:
            continue
        up, conv = (parts[0], parts[1]) if ops[0] == "Resize" else (parts[1], parts[0])
        if not resize.supported(up, consts):
            continue
        native = PointwiseConv.build(conv, consts)
        if native is None or native.weight.shape[1] != native.out_channels:  # padded lanes
            continue
        new = helper.make_node(OP, [conv.input[0], up.input[0]], [add.output[0]],
                               name=add.name or add.output[0], domain=DOMAIN + ".edge")
        natives[id(new)] = UpsampleAddConv(native, [up, conv, add])
        replaced[id(add)] = new
        replaced[id(up)] = replaced[id(conv)] = None
    # the new node takes the Add's place: its inputs exist by then (the Add read both parts)
    return [replaced.get(id(n), n) for n in nodes if replaced.get(id(n), n) is not None]
