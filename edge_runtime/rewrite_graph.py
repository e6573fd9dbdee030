"""Lookups over an ONNX graph while :mod:`edge_runtime.rewrite` rewrites it.

Never imports torch, hidiff or export.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import npops
from .graph import classify

__all__ = ["RewriteGraph", "attrs", "channel_counts", "conv_bias", "drop_unread_initializers",
           "not_per_step", "plain_conv"]


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class RewriteGraph:
    """Lookups over one graph while it is rewritten (names are kept unique)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.inits = {init.name: init for init in graph.initializer}
        self.producer = {o: node for node in graph.node for o in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.names = set(self.inits) | {o for n in graph.node for o in n.output} | {
            i.name for i in graph.input}
        self.channels = channel_counts(model)
        self.kinds = classify(graph)  # const / static / step / dynamic (edge_runtime.graph)
        #: initializers of the match being built; the driver commits or discards them
        self.pending: list[onnx.TensorProto] = []

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return npops.constant_value(node)
        return None

    def only_reader(self, name: str, node) -> bool:
        """``node`` is the one reader of ``name``, which is not a graph output."""
        readers = self.consumers.get(name, [])
        return name not in self.outputs and len(readers) == 1 and readers[0] is node

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def same_channels(self, *names: str) -> bool:
        """Every value has the same channel count, and shape inference knows it."""
        counts = {self.channels.get(n) for n in names}
        return len(counts) == 1 and None not in counts

    def add_init(self, base: str, value: np.ndarray) -> str:
        """A new initializer for the match being built (in ``pending`` until accepted)."""
        name = self.fresh(base)
        self.pending.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def commit(self) -> None:
        """The pending initializers join the graph (their match was accepted)."""
        self.model.graph.initializer.extend(self.pending)
        self.pending = []


def channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Static channel count (dim 1) of every 4-D value shape inference can type."""
    try:
        # data_prop: shapes computed by Shape / Reshape chains (the X-Former's output) too
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes: rewrites that need them do not fire
        inferred = model
    out: dict[str, int] = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            out[v.name] = int(dims[1].dim_value)
    return out


def plain_conv(node, g: RewriteGraph, *, kernel_1x1: bool) -> np.ndarray | None:
    """The weight of a 2-D, ungrouped, unit-stride, undilated ``Conv`` (1 x 1 without padding
    when ``kernel_1x1``), or None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    weight = g.const(node.input[1])
    if weight is None or weight.ndim != 4:
        return None
    a = attrs(node)
    if a.get("group", 1) != 1 or any(s != 1 for s in a.get("strides", [1, 1])) or any(
            d != 1 for d in a.get("dilations", [1, 1])):
        return None
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if kernel_1x1 and (weight.shape[2:] != (1, 1) or any(a.get("pads", [0] * 4))):
        return None
    return weight


def conv_bias(node, g: RewriteGraph) -> np.ndarray | None | bool:
    """The conv's bias (None when it has none; False when it is not a constant)."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    value = g.const(node.input[2])
    return False if value is None else value


def not_per_step(g: RewriteGraph, name: str) -> bool:
    """``name`` is computed outside the per-step part (per image, per step value or const)."""
    return g.kinds.get(name) in ("const", "static", "step")


def drop_unread_initializers(model: onnx.ModelProto, before: dict) -> None:
    """Initializers the removed nodes read and nothing reads any more (the folded weights)."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    read |= {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in read or init.name not in before]
    if len(kept) < len(graph.initializer):
        copies = [onnx.TensorProto() for _ in kept]
        for c, init in zip(copies, kept, strict=True):
            c.CopyFrom(init)
        del graph.initializer[:]
        graph.initializer.extend(copies)
