"""Planning the packed backend's step: who runs each node, in which order, in which layout.

:func:`assign` gives every node of the dynamic part one of ``packed`` (a ``BinaryConv`` the
native kernel can run), ``numpy`` or ``ort``. Elementwise nodes go to NumPy only when they are
connected to packed convs (the *region*: they read a packed / NumPy result, or feed only packed
/ NumPy nodes) and their output is a 4-D feature map; everything else stays in onnxruntime, so
ORT keeps its own fusions (e.g. GELU in the X-Former) and the results stay bit-identical to
the ``onnxruntime`` backend. Region values are NHWC (what the packed kernel reads and writes);
onnxruntime pieces receive and produce NHWC through ``Transpose`` nodes that ORT folds into the
layout reorders of its convolutions (measured free).

:func:`schedule` orders the nodes topologically, preferring the previous node's executor, and
returns the runs of equal executors; :func:`last_reads` gives, per run, the values read for the
last time (freed right after, which keeps the working set and page faults small).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import nhwc, npops

__all__ = [
    "BINARY_CONV", "DOMAIN", "assign", "const_values", "last_reads", "packed_conv_spec",
    "schedule",
]

DOMAIN = "ai.hidiff"
BINARY_CONV = "BinaryConv"


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def const_values(model: onnx.ModelProto, kinds: dict[str, str], nodes) -> dict[str, np.ndarray]:
    """Values of the initializers and const nodes that ``nodes`` read (folded with NumPy)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {o: node for node in graph.node for o in node.output}
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        if name in inits:
            values[name] = numpy_helper.to_array(inits[name])
            return values[name]
        node = producers[name]
        if node.op_type == "Constant":
            out = (npops.constant_value(node),)
        else:
            args = [value(n) if n else None for n in node.input]
            fn = None if any(a is None for a, n in zip(args, node.input, strict=True) if n) \
                else npops.kernel(node, args)
            if fn is None:
                return None  # left to ORT, which folds it itself
            out = fn(*args)
        for o, v in zip(node.output, out, strict=False):
            values[o] = v
        return values[name]

    for node in nodes:
        for name in node.input:
            if name and kinds.get(name) == "const":
                value(name)
    return {k: v for k, v in values.items() if v is not None}


def packed_conv_spec(node, consts: dict[str, np.ndarray]) -> dict | str:
    """The packed layer arguments of a BinaryConv node, or the reason it cannot be packed."""
    if len(node.input) != 4 or any(n not in consts for n in node.input[1:]):
        return "weights, scale or bias are not constant"
    attrs = _attrs(node)
    w, scale, bias = (consts[n] for n in node.input[1:])
    if w.ndim != 4 or not np.all(np.abs(w) == 1):
        return "weights are not +-1 OIHW"
    if int(attrs.get("channels_in", w.shape[1])) != w.shape[1]:
        return "channels_in disagrees with the weights"
    top, left, bottom, right = (int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
    pad_value = float(attrs.get("pad_value", 1.0))
    if pad_value not in (0.0, 1.0):
        return f"pad_value {pad_value} (the kernel takes 1.0 or 0.0)"
    if (top, left) != (bottom, right) and pad_value != 1.0:
        return "asymmetric padding with pad_value 0"
    explicit = None if (top, left) == (bottom, right) else (top, left, bottom, right)
    return {
        "weight": w, "stride": tuple(int(s) for s in attrs.get("strides", [1, 1])),
        "padding": (0, 0) if explicit else (top, left),
        "dilation": tuple(int(d) for d in attrs.get("dilations", [1, 1])),
        "pad_value": pad_value, "scale": scale.astype(np.float32),
        "bias": bias.astype(np.float32), "explicit_pads": explicit,
    }


def _rank(types: dict, name: str) -> int | None:
    t = types.get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return len(t.tensor_type.shape.dim)


def assign(nodes, consts: dict[str, np.ndarray], types: dict, *, use_packed: bool,
           fallbacks: list[str]) -> dict[int, str]:
    """Executor of every node: ``packed``, ``numpy`` or ``ort`` (module docstring)."""
    kinds: dict[int, str] = {}
    for node in nodes:
        if node.domain == DOMAIN and node.op_type == BINARY_CONV:
            spec = packed_conv_spec(node, consts) if use_packed else "packed kernel disabled"
            if isinstance(spec, dict):
                kinds[id(node)] = "packed"
                continue
            fallbacks.append(f"{node.name or node.output[0]}: {spec}")
            kinds[id(node)] = "ort"
        elif (node.op_type in nhwc.ELEMENTWISE and _rank(types, node.output[0]) == 4
              and npops.kernel(node, [consts.get(n) for n in node.input]) is not None):
            kinds[id(node)] = "candidate"
        else:
            kinds[id(node)] = "ort"
    _grow_region(nodes, kinds)
    return kinds


def _grow_region(nodes, kinds: dict[int, str]) -> None:
    producer = {o: node for node in nodes for o in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inside = {"packed", "numpy"}
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if kinds[id(node)] != "candidate":
                continue
            forward = any(kinds[id(producer[n])] in inside for n in node.input if n in producer)
            users = [u for o in node.output for u in consumers.get(o, [])]
            backward = bool(users) and all(kinds[id(u)] in inside for u in users)
            if forward or backward:
                kinds[id(node)] = "numpy"
                changed = True
    for node in nodes:
        if kinds[id(node)] == "candidate":
            kinds[id(node)] = "ort"


def schedule(nodes, kinds: dict[int, str]) -> list[tuple[str, list]]:
    """Topological order preferring the previous node's executor, as runs ``(kind, nodes)``."""
    producer = {o: i for i, node in enumerate(nodes) for o in node.output}
    deps = [{producer[n] for n in node.input if n in producer} for node in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    missing = [len(d) for d in deps]
    ready = sorted(i for i, m in enumerate(missing) if m == 0)
    groups: list[tuple[str, list]] = []
    current = None
    while ready:
        same = [i for i in ready if kinds[id(nodes[i])] == current]
        pick = min(same) if same else min(ready)
        ready.remove(pick)
        kind = kinds[id(nodes[pick])]
        if kind != current or not groups:
            groups.append((kind, []))
            current = kind
        groups[-1][1].append(nodes[pick])
        for u in users[pick]:
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if sum(len(g) for _, g in groups) != len(nodes):
        raise ValueError("the dynamic graph has a cycle")
    return groups


def last_reads(reads: list[set[str]], keep: set[str]) -> list[list[str]]:
    """Per step, the values read for the last time there (not in ``keep``)."""
    last: dict[str, int] = {}
    for i, names in enumerate(reads):
        for name in names:
            last[name] = i
    out: list[list[str]] = [[] for _ in reads]
    for name, i in last.items():
        if name and name not in keep:
            out[i].append(name)
    return out
