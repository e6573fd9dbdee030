"""Graph rewrites that make the refiner step's real-valued layers cheaper.

Each rewrite is exact in real arithmetic; in float32 it regroups sums and rounds folded weights
again, so one step's output moves by about one rounding (1e-7 relative on a trained
``cpu-small`` export). :class:`~edge_runtime.refiner.RefinerRunner` applies them to the refiner
graph before splitting it, so the ``onnxruntime`` and ``packed`` backends run the same rewritten
graph and stay bit-identical to each other. Against the exported file (stock onnxruntime, torch)
they differ like torch and onnxruntime already do: where a binarized activation lies within
that rounding of 0 it flips, so a few mask pixels can change (40 of 35 M on the Kvasir-SEG test
split, ``benchmarks/results/edge.md``).

``narrow_conv``
    A k x k ``Conv`` with few output channels (the refiner's head, 32 -> 1 channel, 3 x 3):
    onnxruntime runs it as im2col + a matrix-vector product, bound by writing the
    (Cin k k) x (H W) column matrix. It becomes a 1 x 1 ``Conv`` to Cout k k channels, one per
    output channel o and tap (dy, dx),

        z[o, dy, dx] = sum_c W[o, c, dy, dx] x[c],

    zero-padded like the input (a 1 x 1 conv without bias maps zero padding to zeros) and
    summed over the k k shifted windows:

        y[o, i, j] = b[o] + sum_{dy, dx} z_padded[o, dy, dx][i + dy, j + dx].

``conv_before_upsample``
    ``Conv`` 1 x 1 (Concat(Resize_nearest(h), skip)) as in the decoder's fusion after
    upsampling. A nearest-neighbour resize only copies pixels, and a 1 x 1 conv is the same
    linear map at every pixel, so they commute:

        Conv(Concat(up(h), s); [W_h W_s], b) = up(Conv(h; W_h)) + Conv(s; W_s, b).

    The h part then runs at the low resolution and the concatenated map is never built.

``bn_through_add``
    ``BatchNormalization(Conv(x) + s)`` (inference mode; the refiner's stem and feature
    injection, where ``s`` is computed once per image) is an affine map per channel,
    ``k (v - mean) + beta`` with ``k = gamma / sqrt(var + eps)``, so

        BN(Conv(x; W, b) + s) = Conv(x; k W, k b) + BN(s).

    Applied where ``s`` does not depend on ``y_t``: ``BN(s)`` then moves to the per-image (or
    per-step-value) part and the per-step part is a conv and an add, which onnxruntime fuses.

``conv_through_add``
    A 1 x 1 ``Conv`` (W1, b1) of ``Conv_a(x) + s`` with ``s`` not depending on ``y_t`` (the
    first feature injection reads the stem, ``Conv_a`` the 3 x 3 conv of the one-channel
    ``y_t``). Two linear maps compose into one conv with ``Conv_a``'s kernel and padding:

        Conv(Conv_a(x; Wa, ba) + s; W1, b1) = Conv(x; W1 Wa, W1 ba) + Conv(s; W1, b1),

    ``(W1 Wa)[o, c, dy, dx] = sum_m W1[o, m] Wa[m, c, dy, dx]``. Applied where the composed conv
    costs less per pixel than what it replaces (``Conv_a`` stays when something else reads it).

``sum_statics``
    ``(d + s1) + s2 = d + (s1 + s2)`` where ``s1`` and ``s2`` are both per-image (or both
    per-step-value) values: their sum leaves the per-step part.

Never imports torch, hidiff or export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .rewrite_graph import (
    RewriteGraph,
    attrs,
    conv_bias,
    drop_unread_initializers,
    not_per_step,
    plain_conv,
)

__all__ = ["REWRITES", "RewriteStats", "rewrite_refiner"]

REWRITES = ("conv_before_upsample", "bn_through_add", "conv_through_add", "sum_statics",
            "narrow_conv")
_BIG = np.iinfo(np.int64).max
_MAX_PASSES = 8


@dataclass
class RewriteStats:
    """How often each rewrite fired (for ``hidiff-edge info`` and the benchmark)."""

    narrow_conv: list[str] = field(default_factory=list)
    conv_before_upsample: list[str] = field(default_factory=list)
    bn_through_add: list[str] = field(default_factory=list)
    conv_through_add: list[str] = field(default_factory=list)
    sum_statics: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in REWRITES}


# -- narrow_conv --------------------------------------------------------------------------------
def _narrow_conv(node, g: RewriteGraph) -> list | None:
    weight = plain_conv(node, g, kernel_1x1=False)
    if weight is None:
        return None
    cout, cin, kh, kw = weight.shape
    taps = kh * kw
    bias = conv_bias(node, g)
    if taps == 1 or cout * taps > cin or bias is False:
        return None
    top, left, bottom, right = attrs(node).get("pads", [0, 0, 0, 0])
    base = node.name or node.output[0]
    z = g.fresh(f"{base}/taps")
    zp = g.fresh(f"{base}/taps_padded")
    # output channel o * taps + dy * kw + dx holds tap (dy, dx) of output channel o
    w_taps = weight.transpose(0, 2, 3, 1).reshape(cout * taps, cin, 1, 1).astype(weight.dtype)
    pads = np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64)
    nodes = [helper.make_node("Conv", [node.input[0], g.add_init(f"{base}/taps_w", w_taps)], [z],
                              name=g.fresh(f"{base}/taps_conv")),
             helper.make_node("Pad", [z, g.add_init(f"{base}/pads", pads)], [zp],
                              name=g.fresh(f"{base}/pad"))]
    axes = g.add_init(f"{base}/axes", np.array([1, 2, 3], dtype=np.int64))
    per_channel = []
    for o in range(cout):
        terms = []
        for dy in range(kh):
            for dx in range(kw):
                c = o * taps + dy * kw + dx
                # rows dy .. dy + H_out of the padded map, H_out = H_padded - kh + 1
                end_y, end_x = kh - 1 - dy, kw - 1 - dx
                starts = np.array([c, dy, dx], dtype=np.int64)
                ends = np.array([c + 1, -end_y if end_y else _BIG, -end_x if end_x else _BIG],
                                dtype=np.int64)
                out = g.fresh(f"{base}/tap{c}")
                nodes.append(helper.make_node(
                    "Slice", [zp, g.add_init(f"{base}/starts{c}", starts),
                              g.add_init(f"{base}/ends{c}", ends), axes], [out],
                    name=g.fresh(f"{base}/slice{c}")))
                terms.append(out)
        if bias is not None:
            terms.append(g.add_init(f"{base}/bias{o}",
                                    bias[o:o + 1].reshape(1, 1, 1, 1).astype(weight.dtype)))
        out = node.output[0] if cout == 1 else g.fresh(f"{base}/sum{o}")
        nodes.append(helper.make_node("Sum", terms, [out], name=g.fresh(f"{base}/sum")))
        per_channel.append(out)
    if cout > 1:
        nodes.append(helper.make_node("Concat", per_channel, [node.output[0]], axis=1,
                                      name=g.fresh(f"{base}/concat")))
    return nodes


# -- conv_before_upsample -----------------------------------------------------------------------
def _nearest_resize(node, g: RewriteGraph) -> bool:
    """A ``Resize`` that copies pixels (nearest) and keeps the batch and channel dims."""
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
        return False
    a = attrs(node)
    mode = a.get("mode", b"nearest")
    coords = a.get("coordinate_transformation_mode", b"half_pixel")
    if mode not in (b"nearest", "nearest") or coords in (b"tf_crop_and_resize",
                                                         "tf_crop_and_resize"):
        return False
    if a.get("axes") is not None or len(node.input) < 3 or len(node.input) > 3:
        return False
    scales = g.const(node.input[2])
    return scales is not None and scales.shape == (4,) and scales[0] == 1 and scales[1] == 1


def _conv_before_upsample(node, g: RewriteGraph) -> tuple[list, list, list] | None:
    weight = plain_conv(node, g, kernel_1x1=True)
    bias = conv_bias(node, g) if weight is not None else False
    if weight is None or bias is False:
        return None
    concat = g.producer.get(node.input[0])
    if (concat is None or concat.op_type != "Concat" or attrs(concat).get("axis") not in (1, -3)
            or not g.only_reader(concat.output[0], node)):
        return None
    widths = [g.channels.get(name) for name in concat.input]
    if None in widths or sum(widths) != weight.shape[1]:
        return None
    resized = [(p := g.producer.get(name)) is not None and _nearest_resize(p, g)
               and g.only_reader(name, concat) for name in concat.input]
    if not any(resized) or all(resized):
        return None  # all-resized would move the bias before the resize: not worth a case
    base = node.name or node.output[0]
    nodes, terms, removed = [], [], [concat]
    start = 0
    bias_at = resized.index(False)
    for i, (name, width) in enumerate(zip(concat.input, widths, strict=True)):
        w = weight[:, start:start + width]
        start += width
        inputs = [name if not resized[i] else g.producer[name].input[0],
                  g.add_init(f"{base}/w{i}", w)]
        if i == bias_at and bias is not None:
            inputs.append(g.add_init(f"{base}/b{i}", bias))
        out = g.fresh(f"{base}/part{i}")
        nodes.append(helper.make_node("Conv", inputs, [out], name=g.fresh(f"{base}/conv{i}")))
        if resized[i]:
            resize = g.producer[name]
            up = g.fresh(f"{base}/part{i}_up")
            new = helper.make_node("Resize", [out, *resize.input[1:]], [up],
                                   name=g.fresh(f"{base}/resize{i}"))
            new.attribute.extend(resize.attribute)
            nodes.append(new)
            removed.append(resize)
            out = up
        terms.append(out)
    # the upsampled parts first and the full-resolution convs last, so that the last Add
    # directly follows a conv (ORT can fuse it into that conv)
    order = [t for t, r in zip(terms, resized, strict=True) if r] + [
        t for t, r in zip(terms, resized, strict=True) if not r]
    acc = order[0]
    for k, t in enumerate(order[1:]):
        out = node.output[0] if k == len(order) - 2 else g.fresh(f"{base}/acc{k}")
        nodes.append(helper.make_node("Add", [acc, t], [out], name=g.fresh(f"{base}/add")))
        acc = out
    return nodes, removed, removed


# -- bn_through_add -----------------------------------------------------------------------------
def _bn_through_add(node, g: RewriteGraph) -> tuple[list, list, list] | None:
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return None
    a = attrs(node)
    if len(node.output) != 1 or a.get("training_mode", 0):
        return None
    params = [g.const(n) for n in node.input[1:5]]
    add = g.producer.get(node.input[0])
    if (any(p is None for p in params) or add is None or add.op_type != "Add"
            or not g.only_reader(add.output[0], node)):
        return None
    for j in (0, 1):
        conv = g.producer.get(add.input[j])
        weight = None if conv is None else plain_conv(conv, g, kernel_1x1=False)
        # only worth it when BN(s) leaves the per-step part
        if (weight is not None and g.only_reader(add.input[j], add)
                and not_per_step(g, add.input[1 - j])
                and g.same_channels(add.input[j], add.input[1 - j])
                and weight.shape[0] == params[0].shape[0]):
            break
    else:
        return None
    bias = conv_bias(conv, g)
    if bias is False:
        return None
    gamma, _, _, var = (p.astype(np.float64) for p in params)
    k = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    base = node.name or node.output[0]
    inputs = [conv.input[0], g.add_init(f"{base}/conv_w", (weight * k.reshape(-1, 1, 1, 1))
                                        .astype(weight.dtype))]
    if bias is not None:
        inputs.append(g.add_init(f"{base}/conv_b", (bias * k).astype(bias.dtype)))
    scaled = g.fresh(f"{base}/conv")
    new_conv = helper.make_node("Conv", inputs, [scaled], name=g.fresh(f"{base}/conv"))
    new_conv.attribute.extend(conv.attribute)
    normed = g.fresh(f"{base}/other")
    bn = helper.make_node("BatchNormalization", [add.input[1 - j], *node.input[1:5]], [normed],
                          name=g.fresh(f"{base}/bn"))
    bn.attribute.extend(node.attribute)
    out = helper.make_node("Add", [scaled, normed], [node.output[0]], name=g.fresh(f"{base}/add"))
    return [new_conv, bn, out], [add, conv], [add, conv]


# -- conv_through_add ---------------------------------------------------------------------------
def _conv_through_add(node, g: RewriteGraph) -> tuple[list, list, list] | None:
    w1 = plain_conv(node, g, kernel_1x1=True)
    if w1 is None or conv_bias(node, g) is False:
        return None
    add = g.producer.get(node.input[0])
    if add is None or add.op_type != "Add":
        return None
    for j in (0, 1):
        conv = g.producer.get(add.input[j])
        wa = None if conv is None else plain_conv(conv, g, kernel_1x1=False)
        if (wa is not None and not_per_step(g, add.input[1 - j]) and wa.shape[0] == w1.shape[1]
                and g.same_channels(add.input[j], add.input[1 - j])):
            break
    else:
        return None
    ba = conv_bias(conv, g)
    if ba is False:
        return None
    # the add and its conv go when nothing else reads them; else they stay (the stem's output
    # is also a residual) and the rewrite pays only where the composed conv is cheaper
    removed = [add] if g.only_reader(add.output[0], node) else []
    if removed and g.only_reader(add.input[j], add):
        removed.append(conv)
    cout, cmid = w1.shape[:2]
    per_pixel_in = wa.shape[1] * wa.shape[2] * wa.shape[3]
    if cout * per_pixel_in >= cout * cmid + (cmid * per_pixel_in if conv in removed else 0):
        return None
    base = node.name or node.output[0]
    m1 = w1[:, :, 0, 0].astype(np.float64)
    composed = np.einsum("om,mcyx->ocyx", m1, wa.astype(np.float64)).astype(wa.dtype)
    inputs = [conv.input[0], g.add_init(f"{base}/composed_w", composed)]
    if ba is not None:
        inputs.append(g.add_init(f"{base}/composed_b", (m1 @ ba.astype(np.float64))
                                 .astype(ba.dtype)))
    dyn = g.fresh(f"{base}/composed")
    new_conv = helper.make_node("Conv", inputs, [dyn], name=g.fresh(f"{base}/composed"))
    new_conv.attribute.extend(conv.attribute)
    other = g.fresh(f"{base}/other")
    moved = helper.make_node("Conv", [add.input[1 - j], *node.input[1:]], [other],
                             name=g.fresh(f"{base}/other"))
    moved.attribute.extend(node.attribute)
    out = helper.make_node("Add", [dyn, other], [node.output[0]], name=g.fresh(f"{base}/add"))
    return [new_conv, moved, out], removed, [add, conv]


# -- sum_statics --------------------------------------------------------------------------------
def _sum_statics(node, g: RewriteGraph) -> tuple[list, list, list] | None:
    """(d + s1) + s2 -> d + (s1 + s2) for s1, s2 computed outside the step (same channel
    count; exact under broadcasting too)."""
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
        return None
    for j in (0, 1):
        inner = g.producer.get(node.input[j])
        s2 = node.input[1 - j]
        if (inner is None or inner.op_type != "Add" or not not_per_step(g, s2)
                or not g.only_reader(inner.output[0], node)):
            continue
        for k in (0, 1):
            d, s1 = inner.input[k], inner.input[1 - k]
            # s1 + s2 leaves the step only when it depends on the image or the step, not both
            one_part = len({g.kinds.get(s1), g.kinds.get(s2)} - {"const"}) <= 1
            if (not_per_step(g, s1) and one_part and not not_per_step(g, d)
                    and g.same_channels(d, s1, s2)):
                base = node.name or node.output[0]
                both = g.fresh(f"{base}/statics")
                return [helper.make_node("Add", [s1, s2], [both], name=g.fresh(f"{base}/pre")),
                        helper.make_node("Add", [d, both], [node.output[0]],
                                         name=g.fresh(f"{base}/add"))], [inner], [inner]
    return None


def _narrow_conv_match(node, g: RewriteGraph) -> tuple[list, list, list] | None:
    nodes = _narrow_conv(node, g)
    return None if nodes is None else (nodes, [], [])


_MATCHERS = {"conv_before_upsample": _conv_before_upsample, "bn_through_add": _bn_through_add,
             "conv_through_add": _conv_through_add, "sum_statics": _sum_statics,
             "narrow_conv": _narrow_conv_match}


def _one_pass(model: onnx.ModelProto, rewrites: tuple[str, ...], stats: RewriteStats) -> bool:
    """Apply every rewrite wherever it matches nodes no other match of this pass touched."""
    g = RewriteGraph(model)
    new_nodes: list = []
    touched: set[str] = set()  # first outputs of nodes replaced or removed in this pass
    dropped: set[str] = set()
    for node in model.graph.node:
        replaced = None
        for name in rewrites:
            g.pending = []
            found = _MATCHERS[name](node, g)
            if found is None:
                continue
            involved = {n.output[0] for n in (node, *found[2])}
            if involved & touched:
                continue  # a node of this match was already rewritten: next pass
            g.commit()
            replaced, removed, _ = found
            touched |= involved
            dropped |= {n.output[0] for n in removed}
            getattr(stats, name).append(node.name or node.output[0])
            break
        for new in [node] if replaced is None else replaced:
            copy = onnx.NodeProto()
            copy.CopyFrom(new)
            new_nodes.append(copy)
    if not touched:
        return False
    # a removed node (Resize, Concat, Add, Conv) comes before the node that replaced it
    del model.graph.node[:]
    model.graph.node.extend(n for n in new_nodes if n.output[0] not in dropped)
    drop_unread_initializers(model, g.inits)
    return True


def rewrite_refiner(model: onnx.ModelProto, *,
                    rewrites: tuple[str, ...] = REWRITES) -> tuple[onnx.ModelProto, RewriteStats]:
    """A copy of ``model`` with ``rewrites`` applied (module docstring) and what fired where.

    Passes repeat until nothing matches (a rewrite can expose another: ``bn_through_add``
    leaves the add that ``conv_through_add`` then reads)."""
    unknown = set(rewrites) - set(REWRITES)
    if unknown:
        raise ValueError(f"rewrites must be among {', '.join(REWRITES)}; got {sorted(unknown)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stats = RewriteStats()
    order = tuple(name for name in REWRITES if name in rewrites)
    for _ in range(_MAX_PASSES):
        if not _one_pass(out, order, stats):
            break
    return out, stats
