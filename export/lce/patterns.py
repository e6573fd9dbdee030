"""Multi-op translations: exact GELU recognition, layer norm, matrix products.

Kept apart from :mod:`export.lce.translate` so each file stays readable; the functions take the
``Translator`` as their first argument.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .analyze import GraphFacts, TranslationError
from .layout import Value

__all__ = ["find_gelu", "gemm", "layer_norm", "matmul"]


def _const_scalar(facts: GraphFacts, name: str) -> float | None:
    if not facts.is_const(name):
        return None
    arr = np.asarray(facts.consts[name])
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _other(node: onnx.NodeProto, name: str) -> str:
    a, b = node.input
    return b if a == name else a


def _only_consumer(facts: GraphFacts, name: str, op: str) -> onnx.NodeProto | None:
    users = facts.consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == op and name not in facts.outputs:
        return users[0]
    return None


def find_gelu(facts: GraphFacts) -> tuple[dict[str, str], set[int]]:
    """Exact GELU as torch exports it: ``Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(.5)``
    (the last two multiplications in either order).

    Returns ({output of the last Mul: x}, ids of the nodes it replaces, the last Mul excluded).
    """
    found: dict[str, str] = {}
    skipped: set[int] = set()
    for erf in facts.nodes:
        if erf.op_type != "Erf":
            continue
        div = facts.producer.get(erf.input[0])
        if div is None or div.op_type not in ("Div", "Mul"):
            continue
        c = _const_scalar(facts, div.input[1])
        want = math.sqrt(2.0) if div.op_type == "Div" else 1.0 / math.sqrt(2.0)
        if c is None or abs(c - want) > 1e-6 or len(facts.consumers.get(div.output[0], [])) != 1:
            continue
        x = div.input[0]
        add = _only_consumer(facts, erf.output[0], "Add")
        if add is None or _const_scalar(facts, _other(add, erf.output[0])) != 1.0:
            continue
        m1 = _only_consumer(facts, add.output[0], "Mul")
        if m1 is None:
            continue
        other = _other(m1, add.output[0])
        if other == x:  # x * (1 + erf) then * 0.5
            m2 = _only_consumer(facts, m1.output[0], "Mul")
            if m2 is None or _const_scalar(facts, _other(m2, m1.output[0])) != 0.5:
                continue
            chain = [div, erf, add, m1]
        else:  # (x * 0.5) * (1 + erf)
            half = facts.producer.get(other)
            if (half is None or half.op_type != "Mul" or x not in half.input
                    or _const_scalar(facts, _other(half, x)) != 0.5
                    or len(facts.consumers.get(other, [])) != 1):
                continue
            m2, chain = m1, [div, erf, add, half]
        found[m2.output[0]] = x
        skipped.update(id(n) for n in chain)
    return found, skipped


def layer_norm(t, node: onnx.NodeProto, attrs: dict) -> None:
    """LayerNormalization over the last axis: MEAN, SUB, MUL, MEAN, ADD eps, RSQRT, MUL, then
    the affine MUL and ADD."""
    v: Value = t.vals[node.input[0]]
    axis = attrs.get("axis", -1) % v.rank
    if axis != v.rank - 1:
        raise TranslationError("LayerNormalization is supported over the last axis only")
    perm = v.perm if v.perm[-1] == axis else tuple(range(v.rank))
    x = t.get(node.input[0], perm)
    stored = t.b.shape(x)
    reduced = (*stored[:-1], 1)
    name = node.output[0]
    axes = t.const("axes", np.array([v.rank - 1], np.int32))

    def tmp(suffix, shape):
        return t.b.tensor(f"{name}/{suffix}", shape, "float32")

    mean = t.emit_raw("MEAN", [x, axes], tmp("mean", reduced), keep_dims=True)
    d = t.emit_raw("SUB", [x, mean], tmp("centered", stored))
    sq = t.emit_raw("MUL", [d, d], tmp("squared", stored))
    var = t.emit_raw("MEAN", [sq, axes], tmp("var", reduced), keep_dims=True)
    eps = t.const("epsilon", np.array([attrs.get("epsilon", 1e-5)], np.float32))
    var_eps = t.emit_raw("ADD", [var, eps], tmp("var_eps", reduced))
    rstd = t.emit_raw("RSQRT", [var_eps], tmp("rstd", reduced))
    y = t.emit_raw("MUL", [d, rstd], tmp("normed", stored))
    scale = np.asarray(t.f.consts[node.input[1]], np.float32)
    y = t.emit_raw("MUL", [y, t.const(node.input[1], scale)], tmp("scaled", stored))
    if len(node.input) > 2 and node.input[2]:
        bias = np.asarray(t.f.consts[node.input[2]], np.float32)
        t.emit("ADD", [y, t.const(node.input[2], bias)], name, perm)
    else:
        t.vals[name] = Value(y, t.f.shapes[name], perm, "float32")


def _batch_operand(t, name: str, rank: int) -> tuple[int, bool]:
    """(tensor, adjoint flag) for a BATCH_MATMUL operand: batch axes in order, last two in
    either order."""
    if t.f.is_const(name):
        arr = np.asarray(t.f.consts[name], np.float32)
        return t.const(name, arr.reshape((1,) * (rank - arr.ndim) + arr.shape)), False
    v: Value = t.vals[name]
    if v.rank == rank and v.perm[:rank - 2] == tuple(range(rank - 2)):
        if v.perm[rank - 2:] == (rank - 2, rank - 1):
            return v.index, False
        return v.index, True
    return t._expand(name, rank, tuple(range(rank))), False


def matmul(t, node: onnx.NodeProto, attrs: dict) -> None:
    """Constant 2-D right operand: FULLY_CONNECTED (keep_num_dims); else BATCH_MATMUL."""
    a, b = node.input
    out = node.output[0]
    if t.f.is_const(b) and np.asarray(t.f.consts[b]).ndim == 2 and not t.f.is_const(a):
        w = np.asarray(t.f.consts[b], np.float32)
        _fully_connected(t, a, w.T, None, out)
        return
    rank = len(t.f.shapes[out])
    x, adj_x = _batch_operand(t, a, rank)
    y, adj_y = _batch_operand(t, b, rank)
    t.emit("BATCH_MATMUL", [x, y], out, tuple(range(rank)), adj_x=adj_x, adj_y=adj_y)


def _fully_connected(t, a: str, w_out_in: np.ndarray, bias, out: str) -> None:
    v: Value = t.vals[a]
    perm = v.perm if v.perm[-1] == v.rank - 1 else tuple(range(v.rank))
    ins = [t.get(a, perm), t.const(f"{out}/weights", np.ascontiguousarray(w_out_in))]
    ins.append(-1 if bias is None else t.const(f"{out}/bias", np.asarray(bias, np.float32)))
    t.emit("FULLY_CONNECTED", ins, out, perm, keep_num_dims=True)


def gemm(t, node: onnx.NodeProto, attrs: dict) -> None:
    """Gemm with constant B (a Linear layer): FULLY_CONNECTED."""
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise TranslationError("Gemm with transA, alpha or beta is not supported")
    a, b = node.input[:2]
    if not t.f.is_const(b):
        raise TranslationError("Gemm with a runtime B is not supported")
    w = np.asarray(t.f.consts[b], np.float32)
    w = w if attrs.get("transB", 0) else w.T
    bias = t.f.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and np.asarray(bias).shape != (w.shape[0],):
        raise TranslationError("Gemm bias must be a vector of the output size")
    _fully_connected(t, a, w, bias, node.output[0])
