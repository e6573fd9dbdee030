"""Fused packed convolutions of the packed executor, and the store of one step's values.

A fused conv (:func:`edge_runtime.plan.fuse`) is ``Sub -> BinaryConv -> [Add residual] ->
[Add zeta] -> [PRelu] -> [Add gamma]`` run as one call of the native kernel: the input is packed
as ``sign(x - sub)``, the epilogue computes ``((y + residual) + zeta)``, PReLU, ``+ gamma`` in the
graph's float32 order, and the kernel may also emit the next conv's packed input. Results are
bit-identical to the same ops in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import nhwc
from .ortutil import to_nchw, to_nhwc
from .plan import words_key as plan_words_key

__all__ = ["StepValues", "channels_vector", "donated_buffer", "fused_conv_step", "pad_words"]


class StepValues:
    """The values of one step: NCHW arrays, NHWC arrays and packed sign words."""

    __slots__ = ("nchw", "nhwc", "words", "threads", "feed_cache", "donate")

    def __init__(self, threads: int, feed_cache: dict, donate: bool = True) -> None:
        self.nchw: dict[str, np.ndarray] = {}
        self.nhwc: dict[str, np.ndarray] = {}
        self.words: dict[str, np.ndarray] = {}
        self.threads = threads
        self.feed_cache = feed_cache
        self.donate = donate  # False when every value is kept (checks)

    def get(self, name: str) -> np.ndarray:
        """The value as NCHW (transposed once from NHWC if needed)."""
        value = self.nchw.get(name)
        if value is None:
            value = self.nchw[name] = to_nchw(self.nhwc[name], self.threads)
        return value

    def get_nhwc(self, name: str) -> np.ndarray:
        """The value as NHWC: full-size NCHW values transposed once, small ones viewed."""
        value = self.nhwc.get(name)
        if value is not None:
            return value
        value = self.nchw[name]
        if value.ndim != 4 or value.shape[2] * value.shape[3] == 1:
            return nhwc.view(value)
        cached = self.feed_cache.get(name)
        if cached is not None and cached[0] is value:
            converted = cached[1]
        else:
            converted = to_nhwc(value, self.threads)
        self.nhwc[name] = converted
        return converted


def fused_conv_step(f, layer, explicit, donor, consts: dict,
                    packed) -> Callable[[StepValues], None]:
    """The closure running fused packed conv ``f`` (a :class:`edge_runtime.plan` fusion) on
    ``layer``: pack ``x - sub`` (or take the words the previous fused conv emitted), run the
    kernel with its epilogue, optionally emit the next conv's packed input; vectors of
    unexpected runtime shape fall back to the ops one by one (bit-identical)."""
    cout = layer.out_channels
    fixed = {n: nhwc.view(v) for n, v in consts.items()}  # for the NumPy fallback
    slope = channels_vector(consts.get(f.slope), 1, cout) if f.slope else None
    in_key = plan_words_key(f.x, f.sub) if f.sub else None
    emit = f.words_for  # (key, threshold name) of the next conv's packed input
    check = f.conv.output[0]
    src, dst = f.x, f.output

    def vector(env: StepValues, name: str | None, n: int):
        if name is None:
            return None
        value = consts.get(name)
        return channels_vector(env.get(name) if value is None else value, n, cout)

    def fallback(env: StepValues) -> None:  # unexpected runtime shapes: the ops one by one
        values: dict[str, np.ndarray] = {}

        def get(name):
            if name in values:
                return values[name]
            return fixed[name] if name in fixed else env.get_nhwc(name)

        nodes = list(f.nodes)
        if f.sub:
            sub = nodes.pop(0)
            x = nhwc.ELEMENTWISE["Sub"](get(sub.input[0]), get(sub.input[1]))
            words = packed.pack_nhwc(x)
        else:
            words = env.words.get(src)
            if words is None:
                words = packed.pack_nhwc(env.get_nhwc(src))
        if explicit is not None:
            words = pad_words(words, explicit)
        values[check] = layer(words)
        for node in nodes:
            values[node.output[0]] = nhwc.ELEMENTWISE[node.op_type](
                *(get(n) for n in node.input))
        env.nhwc[dst] = np.ascontiguousarray(values[dst])
        if not env.donate:
            env.nhwc[check] = values[check]

    def run(env: StepValues) -> None:
        words = env.words.get(in_key) if in_key else env.words.get(src)
        x = None
        if words is None:
            x = env.get_nhwc(src)
            n = x.shape[0]
            sub = vector(env, f.sub, n)
            if f.sub and sub is None:
                return fallback(env)
            words = packed.pack_nhwc(x, sub=sub)
        if explicit is not None:
            words = pad_words(words, explicit)
        n = words.shape[0]
        shape = layer.output_shape(*words.shape[:3])
        res = env.get_nhwc(f.residual) if f.residual else None
        zeta, gamma = vector(env, f.zeta, n), vector(env, f.gamma, n)
        nxt = vector(env, emit[1], n) if emit else None
        if (res is not None and (res.shape != shape or res.dtype != np.float32
                                 or not res.flags.c_contiguous)) or (
                f.zeta and zeta is None) or (f.gamma and gamma is None) or (
                f.slope and slope is None) or (emit and nxt is None):
            return fallback(env)
        out = donated_buffer(env, donor, layer, words)
        if out is not None and res is not None and out is not res and np.shares_memory(
                out, res):
            out = None
        result = layer.fused(words, out=out, residual=res, zeta=zeta, slope=slope,
                             gamma=gamma, pack_sub=nxt)
        if emit:
            env.nhwc[dst], env.words[emit[0]] = result
        else:
            env.nhwc[dst] = result
        if not env.donate:  # checks: the conv's own output too
            env.nhwc[check] = layer(words)
    return run


def pad_words(words: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(words, ((0, 0), (top, bottom), (left, right), (0, 0)))


def donated_buffer(env: StepValues, donor: str | None, layer, words) -> np.ndarray | None:
    """The float buffer of ``donor`` when it may take the conv's output (read last, same
    shape)."""
    out = env.nhwc.get(donor) if donor and env.donate else None
    if out is not None and not (
            out.flags.c_contiguous and out.flags.writeable and out.dtype == np.float32
            and out.shape == layer.output_shape(*words.shape[:3])):
        return None
    return out


def channels_vector(value, n: int, c: int) -> np.ndarray | None:
    """A per-channel float32 operand (NCHW-broadcastable: scalar, (C, 1, 1), (1 or n, C, 1, 1))
    as the kernel's (C,) or (n, C) vector; None when it is not one."""
    if value is None:
        return None
    v = np.asarray(value)
    if v.dtype != np.float32 or v.ndim > 4:
        return None
    if v.size == 1:
        return np.full(c, v.reshape(()), np.float32)
    v = v.reshape((1,) * (4 - v.ndim) + v.shape)
    if v.shape[1:] != (c, 1, 1) or v.shape[0] not in (1, n):
        return None
    v = np.ascontiguousarray(v.reshape(v.shape[0], c))
    return v[0] if v.shape[0] == 1 else v
