"""ONNX refiner step -> TFLite flatbuffer with Larq Compute Engine binary ops, op by op.

Input: :class:`export.lce.analyze.GraphFacts` (the graph specialised to one batch size). Binary
layers (``ai.hidiff::BinaryConv`` / ``BinaryLinear``) become ``LceQuantize`` + ``LceBconv2d``
(:mod:`export.lce.binary_ops`); everything else becomes builtin TFLite ops in NHWC
(:mod:`export.lce.layout` tracks the layouts). Element-wise, shape and gather ops are methods
here; layers are in :mod:`export.lce.layers`, multi-op translations (GELU, layer norm, matrix
products) in :mod:`export.lce.patterns`. :data:`OP_MAPPING` documents the mapping.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx

from . import layers, patterns
from .analyze import GraphFacts, TranslationError
from .binary_ops import QuantizeCache
from .layout import (
    NCHW_TO_NHWC,
    Value,
    compose_transpose,
    only_moves_ones,
    relative_perm,
    reshape_plan,
    storage_shape,
)
from .patterns import find_gelu
from .tflite_writer import ModelBuilder

__all__ = ["OP_MAPPING", "TranslationError", "translate"]

_ELEMENTWISE = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Greater": "GREATER",
                "Less": "LESS", "Max": "MAXIMUM", "Min": "MINIMUM", "Where": "SELECT_V2"}
_UNARY = {"Sigmoid": "LOGISTIC", "Relu": "RELU", "Tanh": "TANH", "Exp": "EXP", "Sqrt": "SQRT",
          "Neg": "NEG", "Abs": "ABS"}
_TFLITE_TYPE = {"float32": 0, "int32": 2, "int64": 4, "bool": 6}

#: ONNX op -> what it becomes (documentation; constant-foldable nodes are folded at export).
OP_MAPPING = {
    "ai.hidiff::BinaryConv": "LceQuantize (shared per input) + [PAD of packed words] + "
                             "LceBconv2d (float out, multiplier = scale, bias = bias)",
    "ai.hidiff::BinaryLinear": "LceQuantize + RESHAPE + 1x1 LceBconv2d + RESHAPE",
    "Conv": "CONV_2D (SAME / VALID, or PAD + VALID)",
    "BatchNormalization": "MUL + ADD (per channel, folded)",
    "Gather (step tables)": "GATHER",
    "Add/Sub/Mul/Div/Greater/Less/Max/Min/Where": "ADD/SUB/MUL/DIV/GREATER/LESS/MAXIMUM/MINIMUM/"
                                                   "SELECT_V2",
    "PRelu": "PRELU", "Sigmoid": "LOGISTIC", "Cast": "CAST",
    "Div/Erf/Add/Mul/Mul (exact GELU)": "GELU (approximate=False)",
    "LayerNormalization": "MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD",
    "MatMul": "FULLY_CONNECTED (constant weights) / BATCH_MATMUL", "Gemm": "FULLY_CONNECTED",
    "Softmax": "SOFTMAX", "ReduceMax/ReduceSum/ReduceMean": "REDUCE_MAX/SUM/MEAN",
    "Resize (nearest, asymmetric, floor, integer scale)": "RESIZE_NEAREST_NEIGHBOR",
    "AveragePool": "AVERAGE_POOL_2D", "Concat": "CONCATENATION",
    "Slice/Split": "STRIDED_SLICE", "Transpose": "(layout bookkeeping, no op)",
    "Reshape/Unsqueeze/Squeeze/Flatten": "RESHAPE or nothing",
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class Translator:
    def __init__(self, facts: GraphFacts, *, canonical_zero: bool = False,
                 description: str = "hidiff refiner step (LCE)") -> None:
        self.f = facts
        self.b = ModelBuilder(description)
        self.vals: dict[str, Value] = {}
        self.consts: dict[tuple[str, tuple], int] = {}
        self.moved: dict[tuple[int, tuple], int] = {}
        self.quantize = QuantizeCache(self.b, canonical_zero)
        self.reshape_root: dict[int, int] = {}

    # -- values -----------------------------------------------------------------------------
    def value(self, name: str) -> Value | None:
        return None if self.f.is_const(name) else self.vals[name]

    def const(self, name: str, array, perm=None) -> int:
        arr = np.asarray(array)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if perm is not None:
            arr = np.transpose(arr, perm)
        key = (name, arr.shape, arr.dtype.str, hashlib.sha1(arr.tobytes()).hexdigest())
        if key not in self.consts:
            self.consts[key] = self.b.const(name, arr)
        return self.consts[key]

    def get(self, name: str, perm=None) -> int:
        """Tensor index of ``name`` stored with ``perm`` (None: as it is)."""
        if self.f.is_const(name):
            return self.const(name, self.f.consts[name], perm)
        v = self.vals[name]
        perm = v.perm if perm is None else tuple(perm)
        if perm == v.perm:
            return v.index
        key = (v.index, v.perm, perm)
        if key not in self.moved:
            out = self.b.tensor(f"{name}/perm{''.join(map(str, perm))}",
                                storage_shape(v.shape, perm), v.dtype)
            if only_moves_ones(v.shape, v.perm, perm):
                self.emit_raw("RESHAPE", [v.index, self._shape_const(self.b.shape(out))], out)
            else:
                rel = np.array(relative_perm(v.perm, perm), np.int32)
                self.emit_raw("TRANSPOSE", [v.index, self.const("perm", rel)], out)
            self.moved[key] = out
        return self.moved[key]

    def _shape_const(self, shape) -> int:
        return self.const("shape", np.array(shape, np.int32))

    def emit_raw(self, op: str, inputs, out: int, **options) -> int:
        inputs = list(inputs)
        if op == "RESHAPE":  # reshape from the start of a reshape chain; pruning drops the rest
            inputs[0] = self.reshape_root.get(inputs[0], inputs[0])
            self.reshape_root[out] = inputs[0]
        self.b.op(op, inputs, [out], **options)
        return out

    def emit(self, op: str, inputs, name: str, perm, dtype: str | None = None, **options) -> Value:
        """Emit builtin ``op`` producing ONNX value ``name`` (logical shape from the facts)."""
        shape = self.f.shapes[name]
        dtype = dtype or self.f.dtypes[name].name
        out = self.b.tensor(name, storage_shape(shape, perm), dtype)
        self.emit_raw(op, inputs, out, **options)
        v = Value(out, shape, tuple(perm), dtype)
        self.vals[name] = v
        return v

    def _expand(self, name: str, rank: int, perm) -> int:
        """``name`` broadcast-ready for an op of ``rank`` stored with ``perm``."""
        if self.f.is_const(name):
            arr = np.asarray(self.f.consts[name])
            arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
            return self.const(name, arr, perm)
        v = self.vals[name]
        if v.rank < rank:
            full = (1,) * (rank - v.rank) + v.shape
            out = self.b.tensor(f"{name}/rank{rank}", full, v.dtype)
            self.emit_raw("RESHAPE", [self.get(name, tuple(range(v.rank))),
                                      self._shape_const(full)], out)
            v = Value(out, full, tuple(range(rank)), v.dtype)
            self.vals[f"{name}/rank{rank}"] = v
            name = f"{name}/rank{rank}"
        return self.get(name, perm)

    def _lead_perm(self, names, rank: int) -> tuple[int, ...]:
        for n in names:
            v = self.value(n) if n else None
            if v is not None and v.rank == rank:
                return v.perm
        return tuple(range(rank))

    # -- driver -----------------------------------------------------------------------------
    def run(self) -> bytes:
        for name in self.f.inputs:
            shape, dtype = self.f.shapes[name], self.f.dtypes[name].name
            perm = NCHW_TO_NHWC if len(shape) == 4 else tuple(range(len(shape)))
            index = self.b.input(name, storage_shape(shape, perm), dtype)
            self.vals[name] = Value(index, shape, perm, dtype)
        gelu, skipped = find_gelu(self.f)
        for node in self.f.nodes:
            if id(node) in skipped:
                continue
            if node.output[0] in gelu:
                x = gelu[node.output[0]]
                self.emit("GELU", [self.get(x)], node.output[0], self.vals[x].perm)
                continue
            method = getattr(self, f"op_{node.op_type}", None)
            function = _HANDLERS.get(node.op_type)
            if (method is None and function is None) or node.domain not in (
                    "", "ai.onnx", "ai.hidiff"):
                raise TranslationError(f"unsupported ONNX op {node.domain or 'ai.onnx'}::"
                                       f"{node.op_type} (node {node.name!r})")
            if method is not None:
                method(node, _attrs(node))
            else:
                function(self, node, _attrs(node))
        for name in self.f.outputs:
            v = self.vals[name]
            perm = NCHW_TO_NHWC if v.rank == 4 else tuple(range(v.rank))
            self.b.output(self.get(name, perm))
        return self.b.finish()

    # -- elementwise ------------------------------------------------------------------------
    def _elementwise(self, node, attrs) -> None:
        out = node.output[0]
        rank = len(self.f.shapes[out])
        perm = self._lead_perm(node.input, rank)
        ins = [self._expand(n, rank, perm) for n in node.input]
        self.emit(_ELEMENTWISE[node.op_type], ins, out, perm)

    op_Add = op_Sub = op_Mul = op_Div = op_Greater = op_Less = op_Max = op_Min = _elementwise
    op_Where = _elementwise

    def _unary(self, node, attrs) -> None:
        v = self.vals[node.input[0]]
        self.emit(_UNARY[node.op_type], [v.index], node.output[0], v.perm)

    op_Sigmoid = op_Relu = op_Tanh = op_Exp = op_Sqrt = op_Neg = op_Abs = _unary

    def op_Identity(self, node, attrs) -> None:
        self.vals[node.output[0]] = self.vals[node.input[0]]

    def op_Cast(self, node, attrs) -> None:
        v = self.vals[node.input[0]]
        dtype = self.f.dtypes[node.output[0]].name
        if dtype == v.dtype:
            self.vals[node.output[0]] = v
            return
        self.emit("CAST", [v.index], node.output[0], v.perm, in_data_type=_TFLITE_TYPE[v.dtype],
                  out_data_type=_TFLITE_TYPE[dtype])

    def op_PRelu(self, node, attrs) -> None:
        v = self.vals[node.input[0]]
        self.emit("PRELU", [v.index, self._expand(node.input[1], v.rank, v.perm)],
                  node.output[0], v.perm)

    def _reshape(self, node, attrs=None) -> None:
        src, out = node.input[0], node.output[0]
        v, new_shape = self.vals[src], self.f.shapes[out]
        plan = reshape_plan(v.shape, v.perm, new_shape)
        if plan is None:
            stored, perm, index = new_shape, tuple(range(len(new_shape))), self.get(
                src, tuple(range(v.rank)))
        else:
            (stored, perm), index = plan, v.index
        if tuple(stored) == v.stored:
            self.vals[out] = Value(index, new_shape, perm, v.dtype)
        else:
            self.emit("RESHAPE", [index, self._shape_const(stored)], out, perm)

    op_Reshape = op_Unsqueeze = op_Squeeze = op_Flatten = _reshape

    def op_Transpose(self, node, attrs) -> None:
        v = self.vals[node.input[0]]
        onnx_perm = attrs.get("perm", list(range(v.rank))[::-1])
        self.vals[node.output[0]] = Value(v.index, self.f.shapes[node.output[0]],
                                          compose_transpose(v.perm, onnx_perm), v.dtype)

    def op_Concat(self, node, attrs) -> None:
        out = node.output[0]
        rank = len(self.f.shapes[out])
        axis = attrs["axis"] % rank
        perm = self._lead_perm(node.input, rank)
        ins = [self.get(n, perm) for n in node.input]
        self.emit("CONCATENATION", ins, out, perm, axis=perm.index(axis))

    def _strided_slice(self, v: Value, out: str, ranges: dict[int, tuple[int, int, int]]):
        begin, end, strides = [], [], []
        for axis in v.perm:
            start, stop, step = ranges.get(axis, (0, v.shape[axis], 1))
            begin.append(start)
            end.append(stop)
            strides.append(step)
        ins = [v.index] + [self.const("slice", np.array(a, np.int32))
                           for a in (begin, end, strides)]
        self.emit("STRIDED_SLICE", ins, out, v.perm)

    def op_Slice(self, node, attrs) -> None:
        v = self.vals[node.input[0]]
        c = self.f.consts
        starts, ends = c[node.input[1]], c[node.input[2]]
        axes = c[node.input[3]] if len(node.input) > 3 and node.input[3] else range(len(starts))
        steps = c[node.input[4]] if len(node.input) > 4 and node.input[4] else [1] * len(starts)
        ranges = {}
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            a = int(a) % v.rank
            lo, hi, step = slice(int(s), int(e), int(st)).indices(v.shape[a])
            if step < 1:
                raise TranslationError(f"Slice with step {step} is not supported")
            ranges[a] = (lo, max(hi, lo), step)
        self._strided_slice(v, node.output[0], ranges)

    def op_Split(self, node, attrs) -> None:
        v = self.vals[node.input[0]]
        axis = attrs.get("axis", 0) % v.rank
        start = 0
        for out in node.output:
            size = self.f.shapes[out][axis]
            self._strided_slice(v, out, {axis: (start, start + size, 1)})
            start += size

    def op_Gather(self, node, attrs) -> None:
        data, indices = node.input
        out = node.output[0]
        axis = attrs.get("axis", 0)
        if self.f.is_const(data):
            arr = np.asarray(self.f.consts[data])
            axis %= arr.ndim
            ind = self.vals[indices]
            self.emit("GATHER", [self.const(data, arr), self.get(indices, tuple(range(ind.rank)))],
                      out, tuple(range(len(self.f.shapes[out]))), axis=axis)
            return
        v = self.vals[data]
        axis %= v.rank
        idx = np.asarray(self.f.consts[indices]).astype(np.int32)
        if idx.ndim > 1:
            raise TranslationError("Gather of a runtime tensor with >1-D constant indices")
        idx = np.where(idx < 0, idx + v.shape[axis], idx)
        perm = v.perm if idx.ndim == 1 else tuple(
            p - (p > axis) for p in v.perm if p != axis)
        self.emit("GATHER", [v.index, self.const("indices", idx)], out, perm,
                  axis=v.perm.index(axis))


_HANDLERS = {**layers.HANDLERS, "LayerNormalization": patterns.layer_norm,
             "MatMul": patterns.matmul, "Gemm": patterns.gemm}


def translate(facts: GraphFacts, *, canonical_zero: bool = False,
              description: str = "hidiff refiner step (LCE)") -> tuple[bytes, dict[str, int]]:
    """The TFLite flatbuffer of ``facts`` and the count of each op in it."""
    t = Translator(facts, canonical_zero=canonical_zero, description=description)
    data = t.run()
    return data, t.b.op_counts()
