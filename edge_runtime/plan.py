"""Planning the packed backend's step: who runs each node, in which order, in which layout.

:func:`assign` gives every node of the dynamic part one of ``packed`` (a ``BinaryConv`` the
native kernel can run), ``numpy`` or ``ort``. Elementwise nodes, 2 x 2 average pools where
onnxruntime's rounding order is the one :mod:`edge_runtime.pool` reproduces, the convolutions of
the 0/1 state ``y_t`` that :mod:`edge_runtime.lut` computes as table lookups, the 1 x 1
convolutions :mod:`edge_runtime.pointwise` reproduces and the decoders' 2x nearest upsampling
(:mod:`edge_runtime.resize`) go to NumPy (``numpy``: run outside ORT,
natively or in NumPy) only when they are connected to packed convs (the *region*: they read a
packed / NumPy result, or feed only packed / NumPy nodes) and their output is a 4-D feature
map; everything else stays in onnxruntime, so ORT keeps its own fusions (e.g. GELU in the
X-Former) and the results stay bit-identical to the ``onnxruntime`` backend. Region values are
NHWC (what the packed kernel reads and writes); onnxruntime pieces receive and produce NHWC
through ``Transpose`` nodes that ORT folds into the layout reorders of its convolutions
(measured free).

:func:`fuse` then folds the NumPy nodes around a packed conv into the kernel's call (the TB
``Sub`` into the packing, residual ``Add`` / RPReLU's ``Add``, ``PRelu``, ``Add`` into its float
epilogue, and the next fused conv's packing into its output): the same float32 operations in
the same order, one pass over each feature map instead of five.

:func:`schedule` orders the nodes topologically, preferring the previous node's executor, and
returns the runs of equal executors; :func:`last_reads` gives, per run, the values read for the
last time (freed right after, which keeps the working set and page faults small).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import nhwc, npops, pool, resize
from .export_format import BINARY_CONV, DOMAIN
from .lut import LutConv
from .pointwise import PointwiseConv
from .shifted import ShiftedSum
from .upadd import UpsampleAddConv

__all__ = [
    "BINARY_CONV", "DOMAIN", "FUSED", "Fusion", "assign", "const_values", "fuse", "last_reads",
    "packed_conv_spec", "schedule",
]

FUSED = "FusedBinaryConv"  # plan-only node (domain ai.hidiff.edge): a packed conv + epilogue


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


def _channels(types: dict, name: str) -> int | None:
    t = types.get(name)
    if t is None or not t.tensor_type.HasField("shape") or len(t.tensor_type.shape.dim) != 4:
        return None
    dim = t.tensor_type.shape.dim[1]
    return dim.dim_value if dim.HasField("dim_value") else None


def assign(nodes, consts: dict[str, np.ndarray], types: dict, *, use_packed: bool,
           fallbacks: list[str], natives: dict | None = None) -> dict[int, str]:
    """Executor of every node: ``packed``, ``numpy`` or ``ort`` (module docstring). With
    ``natives`` (a dict, filled by ``id(node)``), convolutions that run natively and
    bit-identically (:class:`edge_runtime.lut.LutConv` for those of ``y_t``,
    :class:`edge_runtime.pointwise.PointwiseConv` for 1 x 1 ones) are candidates of the region
    (kind ``numpy`` when they join it)."""
    kinds: dict[int, str] = {}
    for node in nodes:
        if natives is not None and isinstance(natives.get(id(node)), FOLDED):
            kinds[id(node)] = "candidate"  # folded groups (when natives is given): see unfold
            continue
        if natives is not None and node.op_type == "Conv":
            native = LutConv.build(node, consts) or PointwiseConv.build(node, consts)
            if native is not None:
                natives[id(node)] = native
                kinds[id(node)] = "candidate"
                continue
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
        elif resize.supported(node, consts) and _rank(types, node.output[0]) == 4:
            kinds[id(node)] = "candidate"
        elif pool.supported(node) and _rank(types, node.output[0]) == 4 and (
                (channels := _channels(types, node.input[0])) and  # unknown: ORT's
                pool.matches_onnxruntime(channels)):
            kinds[id(node)] = "candidate"
        else:
            kinds[id(node)] = "ort"
    _grow_region(nodes, kinds)
    return kinds


#: natives of plan nodes that replace a group of graph nodes (their ``nodes``)
FOLDED = (ShiftedSum, UpsampleAddConv)


def unfold(nodes: list, kinds: dict[int, str], natives: dict) -> list:
    """``nodes`` with each folded group (:mod:`edge_runtime.shifted`,
    :mod:`edge_runtime.upadd`) the plan did not keep native (kind other than ``numpy``) put
    back as its own nodes, kind ``ort``."""
    out = []
    for node in nodes:
        native = natives.get(id(node))
        if isinstance(native, FOLDED) and kinds.get(id(node)) != "numpy":
            for n in native.nodes:
                kinds[id(n)] = "ort"
                out.append(n)
            del natives[id(node)]
            continue
        out.append(node)
    return out


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


@dataclass
class Fusion:
    """A packed conv with the NumPy nodes around it folded into the native kernel's call.

    ``x`` is packed (after subtracting the per-channel ``sub`` when the conv reads a TB
    ``Sub``: the float32 difference, then its sign, as ORT computes Sub then the sign); the
    float output then goes through ``y + residual``, ``+ zeta``, ``PRelu(slope)``, ``+ gamma``
    (each optional, in this order: the graph's order of float32 operations). ``nodes`` are the
    folded nodes in graph order (Sub first), ``words_for`` the packed input of the next fused
    conv this one also emits (``(key, sub)``), if any.
    """

    conv: onnx.NodeProto
    x: str
    output: str
    sub: str | None = None
    residual: str | None = None
    zeta: str | None = None
    slope: str | None = None
    gamma: str | None = None
    nodes: tuple = ()
    words_for: tuple[str, str] | None = None

    @property
    def epilogue(self) -> bool:
        return any((self.residual, self.zeta, self.slope, self.gamma))


def words_key(value: str, sub: str) -> str:
    """Name under which the packed sign words of ``value - sub`` travel between fused convs."""
    return f"{value}\x00-{sub}"


def _per_channel(name: str, consts: dict, types: dict) -> bool:
    """A float operand that broadcasts over N?, C, 1, 1 (a per-channel vector / step table)."""
    if name in consts:
        v = consts[name]
        return v.dtype == np.float32 and v.ndim <= 4 and (
            v.size == 1 or (v.ndim >= 3 and v.shape[-1] == v.shape[-2] == 1
                            and all(d == 1 for d in v.shape[:-3])))
    t = types.get(name)
    if t is None or not t.tensor_type.HasField("shape") or (
            t.tensor_type.elem_type != onnx.TensorProto.FLOAT):
        return False
    dims = t.tensor_type.shape.dim
    return len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value == 1 for d in dims[2:])


def fuse(nodes, kinds: dict[int, str], consts: dict, types: dict, keep: set[str]):
    """Fold NumPy nodes into the packed convs: ``Sub(x, a) -> BinaryConv -> [Add residual] ->
    [Add zeta] -> [PRelu slope] -> [Add gamma]`` (see :class:`Fusion`). Returns the new node
    list (fused nodes in place of their convs, folded nodes removed; ``kinds`` updated) and
    the fusions by ``id`` of the fused node. ``keep``: values that must stay materialised."""
    producer = {o: node for node in nodes for o in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_user(value: str):
        users = consumers.get(value, [])
        if value in keep or len(users) != 1 or kinds[id(users[0])] != "numpy":
            return None
        return users[0]

    folded: set[int] = set()
    fusions: dict[int, Fusion] = {}
    replace: dict[int, onnx.NodeProto] = {}
    for conv in nodes:
        if kinds[id(conv)] != "packed" or id(conv) in folded:
            continue
        f = Fusion(conv=conv, x=conv.input[0], output=conv.output[0])
        sub = producer.get(conv.input[0])
        if (sub is not None and sub.op_type == "Sub" and kinds[id(sub)] == "numpy"
                and conv.input[0] not in keep and consumers.get(conv.input[0]) == [conv]
                and conv.input[0] not in conv.input[1:] and sub.input[0] != sub.input[1]
                and _per_channel(sub.input[1], consts, types)
                and not _per_channel(sub.input[0], consts, types)):
            f.x, f.sub, f.nodes = sub.input[0], sub.input[1], (sub,)
        stage, cur = 0, conv.output[0]
        while stage < 4:
            user = only_user(cur)
            if user is None or len(user.input) != 2 or list(user.input).count(cur) != 1:
                break
            other = user.input[1] if user.input[0] == cur else user.input[0]
            if other in producer and id(producer[other]) in {id(n) for n in f.nodes}:
                break
            channel = _per_channel(other, consts, types)
            if user.op_type == "Add" and stage == 0 and not channel:
                f.residual, stage = other, 1
            elif user.op_type == "Add" and stage <= 1 and channel:
                f.zeta, stage = other, 2
            elif (user.op_type == "PRelu" and stage <= 2 and user.input[0] == cur
                  and other in consts and _per_channel(other, consts, types)):
                f.slope, stage = other, 3
            elif user.op_type == "Add" and stage <= 3 and channel:
                f.gamma, stage = other, 4
            else:
                break
            f.nodes += (user,)
            cur = user.output[0]
        if not f.nodes:
            continue
        f.output = cur
        folded.update(id(n) for n in f.nodes)
        node = helper.make_node(
            FUSED, [f.x, *conv.input[1:4], f.sub or "", f.residual or "", f.zeta or "",
                    f.slope or "", f.gamma or ""], [cur], name=conv.name, domain=DOMAIN + ".edge")
        fusions[id(node)] = f
        replace[id(conv)] = node
        kinds[id(node)] = "packed"
    # a fused conv whose float output the next fused conv packs (after its Sub) emits those
    # words too: the next conv's threshold becomes an input of this one
    by_x: dict[str, list] = {}
    for node, f in ((replace[id(c)], fusions[id(replace[id(c)])]) for c in nodes
                    if id(c) in replace):
        by_x.setdefault(f.x, []).append((node, f))
    for node in list(replace.values()):
        f = fusions[id(node)]
        for _, g in by_x.get(f.output, []):
            if g.sub is not None and g.sub not in producer:  # a feed or constant
                f.words_for = (words_key(f.output, g.sub), g.sub)
                node.input.append(g.sub)
                break
    out = [replace.get(id(n), n) for n in nodes if id(n) not in folded]
    return out, fusions


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
