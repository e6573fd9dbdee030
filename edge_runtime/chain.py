"""Chains of NumPy elementwise nodes of the packed step, run as one native pass.

Between the packed convs and the onnxruntime pieces, the step has runs of elementwise nodes
where each result is read only by the next node, e.g. the time-embedding modulation
``((x + other) * a + b) + skip``. NumPy makes one pass over the feature map per node (reading
and writing every intermediate); :func:`chains` groups such runs and :func:`chain_step` runs a
group with the native ``ew_chain`` (``edge_runtime._packed``): the running value stays in
registers, each node still one float32 operation in the graph's order (bit-identical), one read
of each full-size operand and one write of the result. A chain may start with a table lookup of
``y_t`` (:mod:`edge_runtime.lut`) or a 2x nearest upsampling (:mod:`edge_runtime.resize`),
done in the same pass; when a fused binary conv packs the chain's result after its TB ``Sub``,
the pass writes those packed words too. Operands of unexpected runtime shape fall
back to the nodes one by one.

Two chains that each start with a lookup of ``y_t`` (same kernel, padding and channels), where
the first one's result is read only by a node of the second, run as one pass
(:func:`merge_lookups`): the first chain's value is computed alongside the second's, element
by element, and never stored
(on ``cpu-base``, the stem's ``BatchNormalization`` of ``y_t`` and the first encoder level's
time-modulated one, added together: a full-resolution map neither written nor read back).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import _packed
from .fused import StepValues, channels_vector

__all__ = ["chain_step", "chains", "merge_lookups"]

_OPS = {"Add": ("a", "a"), "Mul": ("m", "m"), "Sub": ("s", "r"), "PRelu": ("p", None)}
_EXACT = ("Add", "Mul", "Sub", "PRelu")  # nhwc kernels the chain reproduces


def chains(group: list, consumers: dict[str, list], keep: set[str],
           starts: frozenset[int] = frozenset()) -> list[list]:
    """``group`` (NumPy nodes in schedule order) as runs whose every node but the last has one
    consumer, the next node of the run, which reads it once; nodes whose ``id`` is in
    ``starts`` (table convolutions of ``y_t``, :mod:`edge_runtime.lut`, and 2x upsamplings,
    :mod:`edge_runtime.resize`) may begin a run."""
    out: list[list] = []
    for node in group:
        prev = out[-1][-1] if out else None
        if (prev is not None and node.op_type in _EXACT and (
                prev.op_type in _EXACT or (id(prev) in starts and len(out[-1]) == 1))
                and prev.output[0] not in keep
                and consumers.get(prev.output[0], []) == [node]
                and list(node.input).count(prev.output[0]) == 1
                and not (node.op_type == "PRelu" and node.input[0] != prev.output[0])):
            out[-1].append(node)
        else:
            out.append([node])
    return out


def merge_lookups(runs: list[list], consumers: dict[str, list], keep: set[str],
                  luts: dict[int, object]) -> list[tuple[list, list | None]]:
    """``runs`` (of :func:`chains`) as ``(run, sub)`` pairs: ``sub`` is an earlier run moved
    into ``run`` (None for the others). Both start with table lookups (``luts``, by node
    ``id``) of the same input sharing rows (:meth:`edge_runtime.lut.LutConv.shares_rows`),
    ``sub``'s result is read once, by one node of ``run`` after its start (as that node's other
    operand), no run between them reads ``sub``'s inputs (so none of them can take their
    buffers), and ``sub`` holds no sub of its own (one level only)."""
    out: list[tuple[list, list | None]] = [(run, None) for run in runs]
    taken: set[int] = set()
    for j, run in enumerate(runs):
        lut = luts.get(id(run[0]))
        if lut is None or not hasattr(lut, "shares_rows"):
            continue
        for i in range(j - 1, -1, -1):
            sub = runs[i]
            other = luts.get(id(sub[0]))
            dst = sub[-1].output[0]
            users = consumers.get(dst, [])
            if (i in taken or out[i][1] is not None or other is None
                    or not hasattr(other, "shares_rows")
                    or sub[0].input[0] != run[0].input[0] or not lut.shares_rows(other)
                    or dst in keep or len(users) != 1 or users[0] not in run[1:]
                    or list(users[0].input).count(dst) != 1
                    or users[0].op_type == "PRelu"):
                continue
            inputs = {n for node in sub for n in node.input} - {n.output[0] for n in sub}
            between = {n for mid in runs[i + 1:j] for node in mid for n in node.input}
            if inputs & between:
                continue
            taken.add(i)
            out[j] = (run, sub)
            break
    return [pair for k, pair in enumerate(out) if k not in taken]


def _operand(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``a`` as an ``ew_chain`` operand for a result of NHWC ``shape``, or None."""
    if a.dtype != np.float32:
        return None
    if a.shape == shape or (a.ndim == 4 and a.shape == (1, *shape[1:])):
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)
    if a.size == 1:
        return a.reshape(1)
    if a.ndim == 4 and a.shape[1:3] == (1, 1) and a.shape[3] == shape[3] and (
            a.shape[0] in (1, shape[0])):
        return np.ascontiguousarray(a.reshape(a.shape[0], shape[3]))
    return None


def chain_step(nodes: list, operands: Callable[..., list], donors: list[str],
               one_by_one: list[Callable[[StepValues], None]], lut=None,
               emit: tuple[str, Callable] | None = None,
               sub: tuple[list, object] | None = None) -> Callable[[StepValues], None]:
    """The closure running chain ``nodes``: ``operands(env, node, skip)`` gives a node's NHWC
    inputs (None for the inputs named in ``skip``: running values, never materialised),
    ``donors`` the values whose buffer may take the result, ``one_by_one`` the nodes' own NumPy
    steps (the fallback); ``lut``: the :class:`edge_runtime.lut.LutConv` of ``nodes[0]`` when
    the chain starts with that lookup; a chain may also start with a 2x ``Resize``. ``emit``:
    ``(key, sub(env))``: also write the packed sign words of ``result - sub`` (the next fused
    binary conv's input) into ``env.words[key]`` in the same pass. ``sub``: ``(sub_nodes,
    sub_lut)``, a lookup chain of :func:`merge_lookups` computed in the same pass (its
    ``one_by_one`` steps come first)."""
    dst = nodes[-1].output[0]
    inner = {n.output[0] for n in nodes[:-1]}
    sub_dst = None
    if sub is not None:
        sub_nodes, sub_lut = sub
        sub_dst = sub_nodes[-1].output[0]
        inner |= {n.output[0] for n in sub_nodes}
    upsample = nodes[0].op_type == "Resize"  # edge_runtime.resize: the 2x copy as the start

    def fallback(env: StepValues) -> None:
        for run in one_by_one:
            run(env)
        for name in inner:
            env.nhwc.pop(name, None)

    def run(env: StepValues) -> None:
        if lut is not None:
            y = env.get(nodes[0].input[0])
            if y.ndim != 4 or y.shape[1] != 1 or y.dtype != np.float32:
                return fallback(env)
            shape, start, body = lut.output_shape(y.shape), None, nodes[1:]
            running = nodes[0].output[0]
        elif upsample:
            start = env.get_nhwc(nodes[0].input[0])
            if start.ndim != 4 or start.dtype != np.float32:
                return fallback(env)
            start = np.ascontiguousarray(start)
            n, h, w, c = start.shape
            shape, body, running = (n, 2 * h, 2 * w, c), nodes[1:], nodes[0].output[0]
        else:
            first = operands(env, nodes[0], ())
            shape = np.broadcast_shapes(*(a.shape for a in first))
            if len(shape) != 4 or shape[3] == 0 or any(a.dtype != np.float32 for a in first):
                return fallback(env)
            at = 0 if first[0].shape == shape else 1
            if first[at].shape != shape or (at == 1 and nodes[0].op_type == "PRelu"):
                return fallback(env)
            start, body, running = np.ascontiguousarray(first[at]), nodes, nodes[0].input[at]
        extra = {}
        if sub_dst is not None:
            sub_ops, sub_args, sub_running = [], [], sub_nodes[0].output[0]
            for node in sub_nodes[1:]:
                at = list(node.input).index(sub_running)
                other = _operand(operands(env, node, (sub_running,))[1 - at], shape)
                if other is None:
                    return fallback(env)
                if _OPS[node.op_type][at] is None:
                    return fallback(env)
                sub_ops.append(_OPS[node.op_type][at])
                sub_args.append(other)
                sub_running = node.output[0]
            extra["sub"] = (sub_lut, "".join(sub_ops).encode(), tuple(sub_args))
        ops, args = [], []
        for k, node in enumerate(body):
            values = first if (k == 0 and lut is None and not upsample) else operands(
                env, node, (running, sub_dst))
            at = list(node.input).index(running)
            forward, backward = _OPS[node.op_type]
            other = None if node.input[1 - at] == sub_dst else _operand(values[1 - at], shape)
            if other is None and node.input[1 - at] != sub_dst:
                return fallback(env)
            ops.append(forward if at == 0 else backward)
            args.append(other)
            running = node.output[0]
        out = None
        for n in donors if env.donate else ():
            buf = env.nhwc.get(n)
            if buf is not None and buf.shape == shape and buf.dtype == np.float32 and \
                    buf.flags.c_contiguous and buf.flags.writeable:
                out = buf
                break
        code = "".join(ops).encode()
        pack = {}
        if emit is not None:
            subtrahend = channels_vector(emit[1](env), shape[0], shape[3])
            if subtrahend is not None:
                pack = {"pack_sub": subtrahend, "words": np.empty(
                    (*shape[:3], (shape[3] + 31) // 32), np.int32)}
        if lut is None:
            env.nhwc[dst] = _packed.ew_chain(start, code, tuple(args), out, upsample=upsample,
                                             threads=env.threads, **pack)
        else:
            result = lut.chain(y, code, tuple(args), out, threads=env.threads, **extra, **pack)
            if result is None:  # y_t is not exactly 0/1: the nodes one by one (ORT convolution)
                return fallback(env)
            env.nhwc[dst] = result
        if pack:
            env.words[emit[0]] = pack["words"]
        return None
    return run
