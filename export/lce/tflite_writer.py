"""A small TFLite flatbuffer writer (the subset of ``schema.fbs`` the LCE export needs).

Written against the TFLite schema (file identifier ``TFL3``, schema version 3) with the plain
``flatbuffers.Builder``; custom-op options are flexbuffer maps (``flatbuffers.flexbuffers``).
Needs only numpy and ``flatbuffers``: it imports nothing of ours, so the LCE environment
(numpy < 2, no torch, no onnx) can load it by file path to build single-op test models.

    b = ModelBuilder()
    x = b.input("x", (1, 8, 8, 4), "float32")
    y = b.tensor("y", (1, 8, 8, 4), "float32")
    b.op("LOGISTIC", [x], [y])
    b.output(y)
    data = b.finish()        # bytes of a .tflite file

Operator options are written from the declarative tables below: for each builtin op its
``BuiltinOptions`` union member and the fields (slot, kind) of that table, so an op is emitted as
``b.op("CONV_2D", ins, outs, padding=1, stride_w=1, ...)``. Unnamed fields keep the schema
default. Custom ops (``b.custom("LceBconv2d", ins, outs, {...})``) carry flexbuffer options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flatbuffers
import numpy as np
from flatbuffers import flexbuffers

__all__ = ["BUILTIN_CODES", "DTYPES", "OPTIONS", "ModelBuilder", "flex_options"]

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
PLACEHOLDER_FOR_GREATER_OP_CODES = 127
CUSTOM = 32

#: numpy dtype name -> TFLite ``TensorType``
DTYPES = {"float32": 0, "int32": 2, "uint8": 3, "int64": 4, "bool": 6, "int8": 9}

#: builtin operator name -> ``BuiltinOperator`` code
BUILTIN_CODES = {
    "ADD": 0, "AVERAGE_POOL_2D": 1, "CONCATENATION": 2, "CONV_2D": 3, "FULLY_CONNECTED": 9,
    "LOGISTIC": 14, "MUL": 18, "RELU": 19, "RESHAPE": 22, "SOFTMAX": 25, "TANH": 28,
    "PAD": 34, "GATHER": 36,
    "TRANSPOSE": 39, "MEAN": 40, "SUB": 41, "DIV": 42, "STRIDED_SLICE": 45, "EXP": 47,
    "CAST": 53, "PRELU": 54, "MAXIMUM": 55, "MINIMUM": 57, "LESS": 58, "NEG": 59, "PADV2": 60,
    "GREATER": 61, "SELECT": 64, "SLICE": 65, "SQRT": 75, "RSQRT": 76, "REDUCE_MAX": 82,
    "SUM": 74, "SQUARE": 92, "RESIZE_NEAREST_NEIGHBOR": 97, "SQUARED_DIFFERENCE": 99,
    "ABS": 101, "SELECT_V2": 123, "BATCH_MATMUL": 126, "GELU": 150,
}  # fmt: skip

#: builtin operator -> (BuiltinOptions union type, {field: (slot, kind)}); kinds: "byte" and
#: "bool" (1 byte), "int" (int32), "float" (float32). A value equal to 0 / False is not written
#: (flatbuffers default elision): every field used here has schema default 0 / false, except the
#: dilation factors (default 1), which are always written as >= 1.
OPTIONS: dict[str, tuple[int, dict[str, tuple[int, str]]]] = {
    "CONV_2D": (1, {"padding": (0, "byte"), "stride_w": (1, "int"), "stride_h": (2, "int"),
                    "fused_activation_function": (3, "byte"),
                    "dilation_w_factor": (4, "int"), "dilation_h_factor": (5, "int")}),
    "AVERAGE_POOL_2D": (5, {"padding": (0, "byte"), "stride_w": (1, "int"),
                            "stride_h": (2, "int"), "filter_width": (3, "int"),
                            "filter_height": (4, "int"),
                            "fused_activation_function": (5, "byte")}),
    "FULLY_CONNECTED": (8, {"fused_activation_function": (0, "byte"),
                            "keep_num_dims": (2, "bool")}),
    "SOFTMAX": (9, {"beta": (0, "float")}),
    "CONCATENATION": (10, {"axis": (0, "int"), "fused_activation_function": (1, "byte")}),
    "ADD": (11, {"fused_activation_function": (0, "byte")}),
    "RESHAPE": (17, {}),
    "MUL": (21, {"fused_activation_function": (0, "byte")}),
    "PAD": (22, {}),
    "GATHER": (23, {"axis": (0, "int"), "batch_dims": (1, "int")}),
    "TRANSPOSE": (26, {}),
    "MEAN": (27, {"keep_dims": (0, "bool")}),
    "SUM": (27, {"keep_dims": (0, "bool")}),
    "REDUCE_MAX": (27, {"keep_dims": (0, "bool")}),
    "SUB": (28, {"fused_activation_function": (0, "byte")}),
    "DIV": (29, {"fused_activation_function": (0, "byte")}),
    "STRIDED_SLICE": (32, {"begin_mask": (0, "int"), "end_mask": (1, "int")}),
    "CAST": (37, {"in_data_type": (0, "byte"), "out_data_type": (1, "byte")}),
    "MAXIMUM": (39, {}),
    "MINIMUM": (39, {}),
    "LESS": (41, {}),
    "PADV2": (43, {}),
    "GREATER": (44, {}),
    "SELECT": (47, {}),
    "SLICE": (48, {}),
    "RESIZE_NEAREST_NEIGHBOR": (74, {"align_corners": (0, "bool"),
                                     "half_pixel_centers": (1, "bool")}),
    "SQUARED_DIFFERENCE": (76, {}),
    "SELECT_V2": (98, {}),
    "BATCH_MATMUL": (101, {"adj_x": (0, "bool"), "adj_y": (1, "bool")}),
    "GELU": (116, {"approximate": (0, "bool")}),
}  # fmt: skip


def flex_options(options: Mapping[str, int | float | bool | str]) -> bytes:
    """A flexbuffer map (keys sorted by the builder) of scalar options, for a custom op."""
    fbb = flexbuffers.Builder()
    with fbb.Map():
        for key, value in options.items():
            if isinstance(value, bool):
                fbb.Bool(key, value)
            elif isinstance(value, int | np.integer):
                fbb.Int(key, int(value))
            elif isinstance(value, float):
                fbb.Float(key, value)
            else:
                fbb.String(key, str(value))
    return bytes(fbb.Finish())


class ModelBuilder:
    """Collects tensors, buffers and operators of one subgraph; :meth:`finish` serialises."""

    def __init__(self, description: str = "hidiff") -> None:
        self.description = description
        self.tensors: list[tuple[tuple[int, ...], int, int, str]] = []
        self.buffers: list[bytes] = [b""]  # buffer 0 is the empty sentinel
        self.opcodes: list[tuple[int, str | None, int]] = []
        self.operators: list[tuple[int, list[int], list[int], str | None, dict, bytes | None]] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.names: set[str] = set()

    # -- tensors ----------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self.names:
            name = f"{base}_{n}"
            n += 1
        self.names.add(name)
        return name

    def tensor(self, name: str, shape: Sequence[int], dtype: str, data: bytes | None = None) -> int:
        """A new tensor (constant when ``data`` is given); returns its index."""
        if dtype not in DTYPES:
            raise ValueError(f"unsupported tensor type {dtype!r}")
        buffer = 0
        if data is not None:
            self.buffers.append(bytes(data))
            buffer = len(self.buffers) - 1
        self.tensors.append((tuple(int(d) for d in shape), DTYPES[dtype], buffer,
                             self._unique(name)))
        return len(self.tensors) - 1

    def const(self, name: str, array) -> int:
        """A constant tensor holding ``array`` (C order, little endian)."""
        a = np.ascontiguousarray(array)
        dtype = a.dtype.name
        if dtype == "float64":
            a, dtype = a.astype(np.float32), "float32"
        return self.tensor(name, a.shape, dtype, a.astype(a.dtype.newbyteorder("<")).tobytes())

    def input(self, name: str, shape: Sequence[int], dtype: str) -> int:
        index = self.tensor(name, shape, dtype)
        self.inputs.append(index)
        return index

    def output(self, index: int) -> None:
        self.outputs.append(index)

    def shape(self, index: int) -> tuple[int, ...]:
        return self.tensors[index][0]

    # -- operators --------------------------------------------------------------------------
    def _opcode(self, builtin: int, custom: str | None, version: int) -> int:
        key = (builtin, custom, version)
        if key not in self.opcodes:
            self.opcodes.append(key)
        return self.opcodes.index(key)

    def op(self, name: str, inputs: Sequence[int], outputs: Sequence[int], *, version: int = 1,
           **options) -> None:
        """A builtin operator; ``options`` are fields of its options table (see OPTIONS)."""
        if name not in BUILTIN_CODES:
            raise ValueError(f"builtin operator {name!r} is not supported by this writer")
        fields = OPTIONS.get(name, (0, {}))[1]
        unknown = set(options) - set(fields)
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}")
        index = self._opcode(BUILTIN_CODES[name], None, version)
        self.operators.append((index, list(inputs), list(outputs), name, dict(options), None))

    def custom(self, name: str, inputs: Sequence[int], outputs: Sequence[int],
               options: Mapping[str, int | float | bool | str] | None = None) -> None:
        """A custom operator (``-1`` marks an omitted optional input) with flexbuffer options."""
        index = self._opcode(CUSTOM, name, 1)
        data = flex_options(options or {})
        self.operators.append((index, list(inputs), list(outputs), None, {}, data))

    def prune(self) -> None:
        """Drop operators nothing reads (and then unused tensors, buffers and op codes)."""
        needed = set(self.outputs)
        keep = []
        for op in reversed(self.operators):
            if any(o in needed for o in op[2]):
                keep.append(op)
                needed.update(i for i in op[1] if i >= 0)
        used = sorted(needed | set(self.inputs))
        remap = {old: new for new, old in enumerate(used)}
        buffers, tensors = [b""], []
        for old in used:
            shape, dtype, buffer, name = self.tensors[old]
            if buffer:
                buffers.append(self.buffers[buffer])
                buffer = len(buffers) - 1
            tensors.append((shape, dtype, buffer, name))
        codes = [self.opcodes[op[0]] for op in keep[::-1]]
        opcodes = list(dict.fromkeys(codes))
        self.operators = [
            (opcodes.index(self.opcodes[i]), [remap[x] if x >= 0 else -1 for x in ins],
             [remap[x] for x in outs], builtin, options, custom)
            for i, ins, outs, builtin, options, custom in keep[::-1]
        ]
        self.opcodes, self.tensors, self.buffers = opcodes, tensors, buffers
        self.inputs = [remap[i] for i in self.inputs]
        self.outputs = [remap[o] for o in self.outputs]

    def op_counts(self) -> dict[str, int]:
        """How many operators of each kind (builtin name or custom code), sorted by name."""
        names = {code: name for name, code in BUILTIN_CODES.items()}
        counts: dict[str, int] = {}
        for op in self.operators:
            builtin, custom, _ = self.opcodes[op[0]]
            key = custom if custom is not None else names[builtin]
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    # -- serialisation ----------------------------------------------------------------------
    def finish(self) -> bytes:
        """Prune, then serialise the model (``TFL3``)."""
        self.prune()
        b = flatbuffers.Builder(1 << 20)
        buffers = [self._buffer(b, data) for data in self.buffers]
        tensors = [self._tensor(b, t) for t in self.tensors]
        operators = [self._operator(b, op) for op in self.operators]
        name = b.CreateString("main")
        sub_inputs = self._int_vector(b, self.inputs)
        sub_outputs = self._int_vector(b, self.outputs)
        tensor_vec = self._offset_vector(b, tensors)
        op_vec = self._offset_vector(b, operators)
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, tensor_vec, 0)
        b.PrependUOffsetTRelativeSlot(1, sub_inputs, 0)
        b.PrependUOffsetTRelativeSlot(2, sub_outputs, 0)
        b.PrependUOffsetTRelativeSlot(3, op_vec, 0)
        b.PrependUOffsetTRelativeSlot(4, name, 0)
        subgraph = b.EndObject()
        codes = [self._operator_code(b, code) for code in self.opcodes]
        code_vec = self._offset_vector(b, codes)
        sub_vec = self._offset_vector(b, [subgraph])
        desc = b.CreateString(self.description)
        buf_vec = self._offset_vector(b, buffers)
        b.StartObject(5)
        b.PrependUint32Slot(0, SCHEMA_VERSION, 0)
        b.PrependUOffsetTRelativeSlot(1, code_vec, 0)
        b.PrependUOffsetTRelativeSlot(2, sub_vec, 0)
        b.PrependUOffsetTRelativeSlot(3, desc, 0)
        b.PrependUOffsetTRelativeSlot(4, buf_vec, 0)
        model = b.EndObject()
        b.Finish(model, file_identifier=FILE_IDENTIFIER)
        return bytes(b.Output())

    @staticmethod
    def _int_vector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependInt32(int(v))
        return b.EndVector()

    @staticmethod
    def _offset_vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    @staticmethod
    def _bytes_vector(b: flatbuffers.Builder, data: bytes, alignment: int) -> int:
        b.StartVector(1, len(data), alignment)
        b.head = b.head - len(data)
        b.Bytes[b.head:b.head + len(data)] = data
        return b.EndVector()

    def _buffer(self, b: flatbuffers.Builder, data: bytes) -> int:
        vec = self._bytes_vector(b, data, 16) if data else None
        b.StartObject(3)
        if vec is not None:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        return b.EndObject()

    def _tensor(self, b: flatbuffers.Builder, tensor) -> int:
        shape, dtype, buffer, name = tensor
        name_off = b.CreateString(name)
        shape_off = self._int_vector(b, shape)
        b.StartObject(10)
        b.PrependUOffsetTRelativeSlot(0, shape_off, 0)
        b.PrependInt8Slot(1, dtype, 0)
        b.PrependUint32Slot(2, buffer, 0)
        b.PrependUOffsetTRelativeSlot(3, name_off, 0)
        return b.EndObject()

    def _operator(self, b: flatbuffers.Builder, op) -> int:
        opcode, inputs, outputs, builtin, options, custom = op
        in_off = self._int_vector(b, inputs)
        out_off = self._int_vector(b, outputs)
        opt_type, opt_off, custom_off = 0, None, None
        if builtin is not None and builtin in OPTIONS:
            opt_type, fields = OPTIONS[builtin]
            b.StartObject(max((s for s, _ in fields.values()), default=-1) + 1)
            for key, value in options.items():
                slot, kind = fields[key]
                if kind == "int":
                    b.PrependInt32Slot(slot, int(value), 0)
                elif kind == "float":
                    b.PrependFloat32Slot(slot, float(value), 0.0)
                elif kind == "bool":
                    b.PrependBoolSlot(slot, bool(value), False)
                else:
                    b.PrependInt8Slot(slot, int(value), 0)
            opt_off = b.EndObject()
        if custom is not None:
            custom_off = self._bytes_vector(b, custom, 1)
        b.StartObject(7)
        b.PrependUint32Slot(0, opcode, 0)
        b.PrependUOffsetTRelativeSlot(1, in_off, 0)
        b.PrependUOffsetTRelativeSlot(2, out_off, 0)
        if opt_off is not None:
            b.PrependUint8Slot(3, opt_type, 0)
            b.PrependUOffsetTRelativeSlot(4, opt_off, 0)
        if custom_off is not None:
            b.PrependUOffsetTRelativeSlot(5, custom_off, 0)
            b.PrependInt8Slot(6, 0, 1)  # custom_options_format FLEXBUFFERS (0), written out
        return b.EndObject()

    @staticmethod
    def _operator_code(b: flatbuffers.Builder, code) -> int:
        builtin, custom, version = code
        custom_off = b.CreateString(custom) if custom is not None else None
        b.StartObject(4)
        b.PrependInt8Slot(0, min(builtin, PLACEHOLDER_FOR_GREATER_OP_CODES), 0)
        if custom_off is not None:
            b.PrependUOffsetTRelativeSlot(1, custom_off, 0)
        b.PrependInt32Slot(2, version, 1)
        b.PrependInt32Slot(3, builtin, 0)
        return b.EndObject()
