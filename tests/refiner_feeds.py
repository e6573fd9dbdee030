"""Helpers of the refiner-step tests (tests/edge): inputs of the exported step (random images
through the segmentor, the boundary values of its dynamic part) and hand-made step graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_runtime.ortutil import make_session


def step_inputs(exported, seed: int = 0, batch: int = 2):
    """Random images, the segmentor's outputs for them and a ``y_t`` drawn from the prior."""
    rng = np.random.default_rng(seed)
    h, w = exported.facts.input_size
    x = rng.standard_normal((batch, exported.facts.in_channels, h, w)).astype(np.float32)
    seg = make_session(exported.files["segmentor"])
    names = [o.name for o in seg.get_outputs()]
    values = dict(zip(names, seg.run(None, {"image": x}), strict=True))
    values["image"] = x
    values["y_t"] = (rng.random(values["prior"].shape) < values["prior"]).astype(np.float32)
    return values


def boundary_values(split, values, step: int, batch: int) -> dict[str, np.ndarray]:
    """The feeds of ``split``'s dynamic part at ``step`` (its static and step parts run)."""
    values = dict(values, step=np.full(batch, step, np.int64))
    for part in (split.static, split.step):
        if part.model is not None:
            out = make_session(part.model).run(part.outputs, {n: values[n] for n in part.inputs})
            values.update(zip(part.outputs, out, strict=True))
    return {n: values[n] for n in split.dynamic.inputs}


def binary_step_model(nodes: list, name: str, inputs: list, inits: list) -> onnx.ModelProto:
    """A graph of ``nodes`` with output ``out``, its ``ai.hidiff::BinaryConv`` function body
    attached (opset 17, IR 10): a refiner step in miniature."""
    from export.ops import binary_conv_function

    graph = helper.make_graph(
        nodes, name, inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.hidiff", 1)],
                              ir_version=10)
    model.functions.append(binary_conv_function(17))
    return model
