"""Splitting the refiner step graph into what depends on the image, the step and ``y_t``.

Each node of ``refiner_step.onnx`` is classified by what its inputs depend on:

``const``    only initializers / ``Constant`` nodes (copied into every part that reads them);
``static``   the image, prior and features (not ``y_t``, not ``step``): computed once per image;
``step``     ``step`` only (the folded per-step tables): computed once per step value and cached
             across images;
``dynamic``  ``y_t`` or both an image and a step input: computed at every reverse step.

:func:`split_refiner` builds one self-contained ONNX model per non-empty part (the model-local
functions, opset imports and the initializers each part reads are copied in). The dynamic part's
inputs are ``y_t`` plus the *boundary* values it reads from the other parts (graph inputs such as
``prior`` pass straight through). Outputs of the static / step parts are exactly those boundary
values, so a runtime runs ``static`` once per image, ``step`` once per step value, and only
``dynamic`` inside the loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx
from onnx import helper

__all__ = [
    "DYNAMIC_INPUT", "STEP_INPUT", "GraphPart", "RefinerSplit", "classify", "content_digest",
    "split_refiner", "submodel", "with_channels_last",
]

DYNAMIC_INPUT = "y_t"
STEP_INPUT = "step"
_KINDS = ("const", "static", "step", "dynamic")


@dataclass
class GraphPart:
    """One part of the split: its model (None when the part is empty) and its interface."""

    kind: str
    model: onnx.ModelProto | None
    inputs: list[str]
    outputs: list[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)


@dataclass
class RefinerSplit:
    """The parts of a refiner step graph and what flows between them."""

    static: GraphPart
    step: GraphPart
    dynamic: GraphPart
    #: boundary values the dynamic part reads that are graph inputs (passed through)
    passthrough: list[str]
    output: str
    kinds: dict[str, str]  # value name -> kind
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)  # value name -> type


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every value (shape inference over the model, functions included)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    except Exception:  # noqa: BLE001 - fall back to the declared types only
        inferred = model
    types: dict[str, onnx.TypeProto] = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = onnx.TypeProto()
        t.CopyFrom(v.type)  # a standalone copy: a sub-message would keep `inferred` alive
        types[v.name] = t
    return types


def classify(graph: onnx.GraphProto, *, dynamic: Iterable[str] = (DYNAMIC_INPUT,),
             step: Iterable[str] = (STEP_INPUT,)) -> dict[str, str]:
    """Kind of every value of ``graph`` (module docstring); nodes in topological order."""
    kinds: dict[str, str] = {init.name: "const" for init in graph.initializer}
    dynamic, step = set(dynamic), set(step)
    for v in graph.input:
        if v.name in kinds:
            continue
        kinds[v.name] = "dynamic" if v.name in dynamic else "step" if v.name in step else "static"
    kinds[""] = "const"  # omitted optional inputs
    for node in graph.node:
        seen = {kinds[name] for name in node.input}
        if "dynamic" in seen or {"static", "step"} <= seen:
            kind = "dynamic"
        elif "step" in seen:
            kind = "step"
        elif "static" in seen:
            kind = "static"
        else:
            kind = "const"
        for out in node.output:
            kinds[out] = kind
    return kinds


def _const_closure(graph: onnx.GraphProto, kinds: dict[str, str],
                   wanted: set[str]) -> list[onnx.NodeProto]:
    """The const nodes needed to produce the const values in ``wanted`` (topological order)."""
    producers = {out: node for node in graph.node for out in node.output}
    need: set[int] = set()
    stack = [name for name in wanted if name in producers]
    while stack:
        node = producers[stack.pop()]
        if id(node) in need:
            continue
        need.add(id(node))
        stack.extend(i for i in node.input if i in producers and kinds[i] == "const")
    return [node for node in graph.node if id(node) in need]


def submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str],
             outputs: list[str], kinds: dict[str, str], types: dict[str, onnx.TypeProto],
             name: str) -> onnx.ModelProto:
    """A self-contained model of ``nodes`` of ``model`` with the given interface: the const
    nodes and initializers they read, the model-local functions and the opset imports are
    copied in; ``types`` gives the types of the interface values."""
    graph = model.graph
    produced = {out for node in nodes for out in node.output}
    read = {n for node in nodes for n in node.input if n and n not in produced}
    const_read = {n for n in read if kinds.get(n) == "const" and n not in inputs}
    inits = {init.name: init for init in graph.initializer}
    const_nodes = _const_closure(graph, kinds, {n for n in const_read if n not in inits})
    const_read |= {n for node in const_nodes for n in node.input if n}

    def value_info(value: str) -> onnx.ValueInfoProto:
        if value not in types:
            raise ValueError(f"no type known for {value!r}")
        info = onnx.ValueInfoProto(name=value)
        info.type.CopyFrom(types[value])
        return info

    sub = helper.make_graph(
        const_nodes + list(nodes), name,
        [value_info(n) for n in inputs], [value_info(n) for n in outputs],
        [inits[n] for n in sorted(const_read) if n in inits],
    )
    part = helper.make_model(sub, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)
    part.functions.extend(model.functions)
    return part


def _make_part(model: onnx.ModelProto, kind: str, nodes: list[onnx.NodeProto],
               inputs: list[str], outputs: list[str], kinds: dict[str, str],
               types: dict[str, onnx.TypeProto]) -> GraphPart:
    if not nodes and not outputs:
        return GraphPart(kind, None, inputs, outputs)
    part = submodel(model, nodes, inputs, outputs, kinds, types, f"{model.graph.name}_{kind}")
    return GraphPart(kind, part, inputs, outputs, list(nodes))


def split_refiner(model: onnx.ModelProto) -> RefinerSplit:
    """Split a refiner step model into its static, step and dynamic parts (module docstring)."""
    graph = model.graph
    kinds = classify(graph)
    types = _value_types(model)
    graph_inputs = [v.name for v in graph.input if kinds.get(v.name) != "const"]
    if len(graph.output) != 1:
        raise ValueError("the refiner step graph must have exactly one output")
    output = graph.output[0].name
    if kinds.get(output) != "dynamic":
        raise ValueError(f"the refiner output {output!r} does not depend on {DYNAMIC_INPUT!r}")
    by_kind: dict[str, list[onnx.NodeProto]] = {k: [] for k in _KINDS}
    for node in graph.node:
        by_kind[kinds[node.output[0]]].append(node)
    # values the dynamic nodes read from the static / step parts (or straight from the inputs)
    boundary: dict[str, list[str]] = {"static": [], "step": []}
    seen: set[str] = set()
    for node in by_kind["dynamic"]:
        for name in node.input:
            kind = kinds.get(name)
            if kind in boundary and name not in seen:
                seen.add(name)
                boundary[kind].append(name)
    inputs_of = {"static": [], "step": []}
    passthrough: list[str] = []
    for kind in ("static", "step"):
        read = {name for node in by_kind[kind] for name in node.input}
        inputs_of[kind] = [n for n in graph_inputs if kinds[n] == kind and n in read]
        passthrough += [n for n in boundary[kind] if n in graph_inputs]
    parts = {}
    for kind in ("static", "step"):
        outputs = [n for n in boundary[kind] if n not in graph_inputs]
        parts[kind] = _make_part(model, kind, by_kind[kind], inputs_of[kind], outputs, kinds,
                                 types)
    dyn_inputs = [DYNAMIC_INPUT, *boundary["static"], *boundary["step"]]
    parts["dynamic"] = _make_part(model, "dynamic", by_kind["dynamic"], dyn_inputs, [output],
                                  kinds, types)
    return RefinerSplit(parts["static"], parts["step"], parts["dynamic"], passthrough, output,
                        kinds, types)


def _nhwc_type(t: onnx.TypeProto) -> onnx.TypeProto:
    out = onnx.TypeProto()
    out.CopyFrom(t)
    dims = out.tensor_type.shape.dim
    if len(dims) == 4:
        old = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
        for o, d in zip(old, dims, strict=True):
            o.CopyFrom(d)
        for i, j in enumerate((0, 2, 3, 1)):
            dims[i].CopyFrom(old[j])
    return out


def with_channels_last(model: onnx.ModelProto, inputs: set[str], outputs: set[str],
                       drop_nchw: set[str]) -> onnx.ModelProto:
    """Give ``model`` NHWC twins of some 4-D inputs / outputs (named ``<name>__nhwc``).

    An NHWC input replaces the NCHW one (a ``Transpose`` restores it inside); an NHWC output is
    added after a ``Transpose``; outputs in ``drop_nchw`` lose their NCHW form. ORT folds such
    transposes into the layout reorders of its NCHWc convolutions.
    """
    graph = model.graph
    pre, post = [], []
    for info in graph.input:
        if info.name in inputs:
            pre.append(helper.make_node("Transpose", [info.name + "__nhwc"], [info.name],
                                        perm=[0, 3, 1, 2]))
            info.type.CopyFrom(_nhwc_type(info.type))
            info.name = info.name + "__nhwc"
    new_outputs = []
    for info in graph.output:
        if info.name in outputs:
            post.append(helper.make_node("Transpose", [info.name], [info.name + "__nhwc"],
                                         perm=[0, 2, 3, 1]))
            twin = onnx.ValueInfoProto(name=info.name + "__nhwc")
            twin.type.CopyFrom(_nhwc_type(info.type))
            new_outputs.append(twin)
        if info.name not in drop_nchw:
            new_outputs.append(info)
    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [onnx.ValueInfoProto() for _ in new_outputs]
    for k, v in zip(kept, new_outputs, strict=True):
        k.CopyFrom(v)
    del graph.output[:]
    graph.output.extend(kept)
    return model


def _node_digest(digest, nodes) -> None:
    for node in nodes:
        digest.update(repr((node.domain, node.op_type, list(node.input),
                            list(node.output))).encode())
        for attr in sorted(node.attribute, key=lambda a: a.name):
            digest.update(attr.SerializeToString(deterministic=True))


def content_digest(model: onnx.ModelProto) -> str:
    """sha256 of what ``model`` computes: its interface, nodes (domain, op, wiring, attributes),
    initializers (name, dtype, shape, values) and model-local functions; not node names, doc
    strings or how the file happens to be serialized. Two parts split from the same graph by
    the same runtime have the same digest."""
    import hashlib

    from onnx import numpy_helper

    digest = hashlib.sha256()
    graph = model.graph
    digest.update(repr(([i.name for i in graph.input], [o.name for o in graph.output])).encode())
    _node_digest(digest, graph.node)
    for init in sorted(graph.initializer, key=lambda i: i.name):
        array = numpy_helper.to_array(init)
        digest.update(repr((init.name, array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    for function in sorted(model.functions, key=lambda f: (f.domain, f.name)):
        digest.update(repr((function.domain, function.name, list(function.input),
                            list(function.output))).encode())
        _node_digest(digest, function.node)
    return digest.hexdigest()
