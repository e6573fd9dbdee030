"""Static facts of ``refiner_step.onnx`` at a fixed batch size, for the TFLite translation.

TFLite (and LCE's interpreter) runs static shapes, so the ONNX graph is specialised to one batch
size. One onnxruntime run with every intermediate value exposed as an output gives the shape and
dtype of every tensor; a value is *constant* when it cannot depend on the model inputs
(initializers, ``Constant`` nodes, ``Shape`` of a static shape, and every node whose inputs are
all constant): its value is taken from that run and the node is not translated. What remains is
the runtime part of the graph: the binary layers, the convolutions, the step-table ``Gather``s and
the glue between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["GraphFacts", "TranslationError", "analyze"]

_ORT_IR_VERSION = 10  # onnxruntime 1.31 refuses IR 14 (what onnx 1.23 writes by default)


class TranslationError(ValueError):
    """The ONNX graph has an op or attribute the TFLite/LCE translation does not support."""


@dataclass
class GraphFacts:
    """The specialised graph: runtime nodes in topological order plus every tensor's facts."""

    model: onnx.ModelProto
    batch: int
    inputs: list[str]
    outputs: list[str]
    nodes: list[onnx.NodeProto]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)

    def is_const(self, name: str) -> bool:
        return name in self.consts


def _example_inputs(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of the right shapes; int64 inputs (the step) get 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            feeds[value.name] = np.ones(dims, np.int64)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _run_all(model: onnx.ModelProto, names: list[str], feeds) -> dict[str, np.ndarray]:
    """Run ``model`` in onnxruntime (no graph optimisation) returning the named values."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = min(m.ir_version, _ORT_IR_VERSION)
    existing = {o.name for o in m.graph.output}
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for name in names:
        if name not in existing:
            m.graph.output.append(helper.make_tensor_value_info(name, types.get(name, 1), None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    return dict(zip(wanted, session.run(wanted, feeds), strict=True))


def analyze(model: onnx.ModelProto, batch: int = 1) -> GraphFacts:
    """Specialise ``model`` to ``batch`` and classify its tensors (see the module docstring)."""
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    input_names = [i.name for i in graph.input if i.name not in inits]
    facts = GraphFacts(model=model, batch=batch, inputs=input_names,
                       outputs=[o.name for o in graph.output], nodes=[])
    feeds = _example_inputs(model, batch)
    inner = [o for n in graph.node if n.op_type != "Constant" for o in n.output if o]
    values = _run_all(model, inner, {k: feeds[k] for k in input_names})
    values.update(feeds)

    consts: dict[str, np.ndarray] = dict(inits)
    for node in graph.node:
        for out in node.output:
            facts.producer[out] = node
        for name in node.input:
            facts.consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            continue
        static = node.op_type == "Shape" or all(i in consts for i in node.input if i)
        if static:
            for out in node.output:
                consts[out] = np.asarray(values[out])
        else:
            facts.nodes.append(node)
    for name, value in {**values, **consts}.items():
        arr = np.asarray(value)
        facts.shapes[name] = tuple(int(d) for d in arr.shape)
        facts.dtypes[name] = arr.dtype
    facts.consts = consts
    facts.nodes = _live(facts.nodes, facts.outputs, consts)
    return facts


def _live(nodes: list[onnx.NodeProto], outputs: list[str], consts) -> list[onnx.NodeProto]:
    """The runtime nodes the outputs depend on, in their original (topological) order."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i and i not in consts)
    return keep[::-1]
