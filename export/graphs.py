"""The two exported graphs as torch modules, and torch -> ONNX with the post-processing.

``segmentor.onnx``   ``image (N, C, H, W)`` -> ``prior (N, K, H, W)`` (sigmoid for K = 1, softmax
                     over channels for K > 1) and ``feature_0 .. feature_{m-1}``: the segmentor
                     features the refiner reads, in the segmentor's order (finest first).
``refiner_step.onnx`` ``image, y_t, prior, feature_0 .. feature_{m-1}, step`` -> ``probabilities
                     (N, K, H, W)``: the refiner's output after the sigmoid. ``step`` is int64 of
                     shape ``(N,)``, the ORIGINAL step index of each sample (0..T; 1..T are used).

Every input and output has a dynamic batch axis ``N``; the spatial size is fixed at export
(the X-Former's token count depends on it).

:func:`to_onnx` runs the legacy exporter (``dynamo=False``) and then makes the file
self-contained and reproducible: the model-local functions of the custom ops are attached, doc
strings (which could hold paths) are removed, ``ir_version`` is set, metadata is written sorted by
key, and every check (``onnx.checker`` full check, strict shape inference) must pass.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import onnx
import torch
from torch import Tensor, nn

from export.modules import ExportBinaryConv, ExportBinaryLinear
from export.ops import DOMAIN, DOMAIN_VERSION, custom_functions

__all__ = [
    "BATCH_AXIS",
    "RefinerStepGraph",
    "SegmentorGraph",
    "check_model",
    "refiner_feature_indices",
    "to_onnx",
]

BATCH_AXIS = "N"


def refiner_feature_indices(refiner: nn.Module) -> tuple[int, ...]:
    """Indices of the segmentor features the refiner reads (injections and the X-Former)."""
    num = len(getattr(refiner, "feature_strides", ()))
    used: set[int] = set()
    injected = getattr(refiner, "injected", None)
    if injected is None:
        return tuple(range(num))
    used.update(j for j in injected if j is not None)
    if getattr(refiner, "xformer", None) is not None and refiner.xformer_feature is not None:
        used.add(int(refiner.xformer_feature))
    return tuple(sorted(used))


class SegmentorGraph(nn.Module):
    """``image -> (prior, *features[j] for j in feature_indices)``."""

    def __init__(self, segmentor: nn.Module, feature_indices: Sequence[int]) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.feature_indices = tuple(feature_indices)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.segmentor(image)
        prior = self.segmentor.prior_from_logits(out.logits)
        return (prior, *(out.features[j] for j in self.feature_indices))


class RefinerStepGraph(nn.Module):
    """``(image, y_t, prior, *features, step) -> sigmoid(refiner(...))``.

    ``features`` are the refiner's features only (``feature_indices`` of the segmentor's
    ``num_features``); the others are passed to the refiner as ``None`` (it never reads them).
    """

    def __init__(
        self, refiner: nn.Module, feature_indices: Sequence[int], num_features: int
    ) -> None:
        super().__init__()
        self.refiner = refiner
        self.feature_indices = tuple(feature_indices)
        self.num_features = int(num_features)

    def forward(self, image: Tensor, y_t: Tensor, prior: Tensor, *rest: Tensor) -> Tensor:
        *features, step = rest
        if len(features) != len(self.feature_indices):
            raise ValueError(f"expected {len(self.feature_indices)} features, got {len(features)}")
        full: list[Tensor | None] = [None] * self.num_features
        for j, f in zip(self.feature_indices, features, strict=True):
            full[j] = f
        return torch.sigmoid(self.refiner(image, y_t, prior, tuple(full), step))


def to_onnx(
    module: nn.Module,
    args: tuple[Tensor, ...],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    ir_version: int,
    metadata: Mapping[str, str],
) -> onnx.ModelProto:
    """Export ``module(*args)`` and post-process (see the module docstring); checks included."""
    buffer = io.BytesIO()
    dynamic = {name: {0: BATCH_AXIS} for name in (*input_names, *output_names)}
    binary = (ExportBinaryConv, ExportBinaryLinear)
    uses_custom = any(isinstance(m, binary) for m in module.modules())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints / shape checks
        torch.onnx.export(
            module.eval(),
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            custom_opsets={DOMAIN: DOMAIN_VERSION} if uses_custom else None,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic,
            do_constant_folding=True,
            export_params=True,
            training=torch.onnx.TrainingMode.EVAL,
        )
    model = onnx.load_from_string(buffer.getvalue())
    return finalize(model, opset=opset, ir_version=ir_version, metadata=metadata)


def finalize(
    model: onnx.ModelProto, *, opset: int, ir_version: int, metadata: Mapping[str, str]
) -> onnx.ModelProto:
    """Attach custom-op functions, strip doc strings, set IR version and metadata, type outputs."""
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    _drop_initializer_identities(model.graph)
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    del model.functions[:]
    model.functions.extend(custom_functions(opset, used))
    imports = {op.domain: op.version for op in model.opset_import}
    imports[""] = opset
    if used:
        imports[DOMAIN] = DOMAIN_VERSION
    else:
        imports.pop(DOMAIN, None)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    model.ir_version = ir_version
    del model.metadata_props[:]
    for key in sorted(metadata):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = str(metadata[key])
    _type_outputs(model)
    check_model(model)
    return model


def _drop_initializer_identities(graph: onnx.GraphProto) -> None:
    """The exporter deduplicates equal initializers (e.g. zero biases) through ``Identity``
    nodes; point the consumers at the initializer itself, so every custom node reads its weights,
    scale and bias directly from initializers."""
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not alias:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _type_outputs(model: onnx.ModelProto) -> None:
    """Give graph outputs the shapes strict shape inference finds (custom nodes leave the
    exporter without one); drop intermediate value_info so the file carries only what it needs."""
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    known = {v.name: v for v in inferred.graph.output}
    for out in model.graph.output:
        out.type.CopyFrom(known[out.name].type)
        dims = out.type.tensor_type.shape.dim
        if dims:  # keep the batch axis symbolic whatever inference named it
            dims[0].Clear()
            dims[0].dim_param = BATCH_AXIS


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` full check and strict shape inference (raises on failure)."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
