"""The packed backend's executor for the per-step part of the refiner graph.

The plan (:mod:`edge_runtime.plan`) gives every node of the dynamic part to the native packed
kernel, NumPy or onnxruntime. This module turns the plan into a list of closures:

- a packed ``BinaryConv``: its input is packed (``pack_nhwc`` / ``pack_nchw``, or taken packed
  from a previous packed conv), the native XNOR-popcount kernel computes
  ``int * scale + bias`` in NHWC; when every consumer is another packed conv the output stays
  packed (the kernel's threshold output ``y < 0``, i.e. the consumer's ``sign(y)``);
- a fused packed conv (:func:`edge_runtime.plan.fuse`): packs ``x - sub`` (or takes the words
  the previous fused conv emitted), runs the kernel with its epilogue (residual, zeta, PReLU,
  gamma) and optionally emits the next conv's packed input; the output may take the residual's
  buffer (in place); vectors of unexpected runtime shape fall back to the ops one by one;
- a NumPy elementwise node (or 2 x 2 average pool) of the region: NHWC, bit-identical to ORT's
  NCHW result; runs of elementwise nodes each read only by the next go through one native pass
  (:mod:`edge_runtime.chain`);
- a run of ORT nodes: one sub-model, fed and producing NHWC where the region needs it.

Values are dropped after their last reader. Values the step receives from the static part are
converted to NHWC at most once per image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import nhwc, pool, resize, shifted, upadd
from .chain import chain_step, chains, merge_lookups
from .fused import StepValues, channels_vector, donated_buffer, fused_conv_step, pad_words
from .graph import RefinerSplit, submodel, with_channels_last
from .lut import LutConv
from .ortutil import make_session
from .plan import assign, const_values, fuse, last_reads, packed_conv_spec, schedule, unfold
from .plan import words_key as plan_words_key

__all__ = ["PlanStats", "StepExecutor"]

#: onnxruntime pieces containing these get the executor's threads (the others one thread)
_SPLIT_OPS = frozenset({"Conv", "ConvTranspose", "BinaryConv"})


@dataclass
class PlanStats:
    """What the plan put where (for ``hidiff-edge info`` and the benchmark)."""

    packed: int = 0
    packed_chained: int = 0
    fused: int = 0  # elementwise nodes folded into packed convs (their native epilogue)
    packed_words: int = 0  # fused convs that also emit the next conv's packed input
    numpy: int = 0
    ort: int = 0
    ort_sessions: int = 0
    fallbacks: list[str] = field(default_factory=list)  # binary convs left to ORT, and why


class StepExecutor:
    """Runs the dynamic part of a :class:`RefinerSplit` (see the module docstring).

    ``use_packed=False`` leaves every binary conv to onnxruntime (for comparisons);
    ``keep_specs=True`` keeps the float weights of the packed convs for :meth:`binary_layers`
    (otherwise only the packed words stay in memory).
    """

    def __init__(self, model: onnx.ModelProto, split: RefinerSplit, *, threads: int = 1,
                 use_packed: bool = True, keep_specs: bool = False) -> None:
        from . import packed

        self._packed = packed
        self.threads = threads
        self.stats = PlanStats()
        nodes = split.dynamic.nodes
        self.inputs = list(split.dynamic.inputs)
        self.output = split.output
        self.consts = const_values(model, split.kinds, nodes)
        self._natives: dict[int, object] = {}  # native convolutions (lut / pointwise), sums
        if use_packed:  # groups of nodes run as one native pass each
            nodes = shifted.fold(nodes, self.consts, self._natives)  # the head's shifted sum
            nodes = upadd.fold(nodes, self.consts, self._natives)  # decoders: upsample + conv
        kinds = assign(nodes, self.consts, split.types, use_packed=use_packed,
                       fallbacks=self.stats.fallbacks,
                       natives=self._natives if use_packed else None)
        nodes = unfold(nodes, kinds, self._natives)
        nodes, self._fusions = fuse(nodes, kinds, self.consts, split.types, {self.output})
        self.stats.fused = sum(len(f.nodes) for f in self._fusions.values())
        self.stats.packed_words = sum(f.words_for is not None for f in self._fusions.values())
        words_reader = {f.words_for[0]: None for f in self._fusions.values() if f.words_for}
        self._kind_of = {o: kinds[id(node)] for node in nodes for o in node.output}
        # a NumPy-produced value a fused conv packs after its TB Sub (a feed or constant): the
        # elementwise chain ending in it writes those words in the same pass (chain_step)
        self._chain_words: dict[str, tuple[str, str]] = {}
        for f in self._fusions.values():
            if f.sub and self._kind_of.get(f.x) == "numpy" and f.sub not in self._kind_of \
                    and f.x not in self._chain_words:
                key = plan_words_key(f.x, f.sub)
                self._chain_words[f.x] = (key, f.sub)
                words_reader[key] = None
        self._consumers: dict[str, list] = {}
        for node in nodes:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        #: inputs read only by NumPy elementwise nodes, which broadcast them over the batch: a
        #: batch of 1 serves every chain (RefinerRunner.batch_shared)
        self.broadcast_inputs = {
            name for name in self.inputs if self._consumers.get(name) and all(
                kinds[id(u)] == "numpy" and u.op_type in nhwc.ELEMENTWISE
                and u.op_type != "PRelu" for u in self._consumers[name])}
        #: 4-D inputs read only by native and NumPy nodes (all through their NHWC form): the
        #: caller may give them NHWC (``nhwc_feeds``; RefinerRunner does for the static part)
        self.nhwc_capable = frozenset(
            name for name in self.inputs if _rank(split, name) == 4 and self._consumers.get(
                name) and all(kinds[id(u)] in ("numpy", "packed")
                              for u in self._consumers[name]))
        self.nhwc_feeds: frozenset[str] = frozenset()
        self._binary_out: set[str] = set()
        self._packed_nodes: list = []
        self._feed_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._steps: list[Callable[[StepValues], None]] = []
        self.labels: list[str] = []
        reads: list[set[str]] = []
        groups = schedule(nodes, kinds)
        last_reader: dict[str, int] = {}  # value -> id of the last node (in order) reading it
        for _, group in groups:
            for node in group:
                for name in node.input:
                    last_reader[name] = id(node)
        self._last_reader = last_reader
        for kind, group in groups:
            if kind == "ort":
                self._steps.append(self._ort_step(model, group, split, kinds))
                self.labels.append("ort:" + "+".join(n.op_type for n in group))
                reads.append({n for node in group for n in node.input})
                self.stats.ort += len(group)
                self.stats.ort_sessions += 1
                continue
            if kind == "numpy":
                starts = frozenset([k for k, v in self._natives.items() if isinstance(v, LutConv)]
                                   + [id(n) for n in group if n.op_type == "Resize"])
                runs = chains(group, self._consumers, {self.output}, starts)
                for run, sub in merge_lookups(runs, self._consumers, {self.output},
                                              self._natives):
                    self._steps.append(self._numpy_step(run[0]) if len(run) == 1 and not sub
                                       else self._chain_step(run, sub))
                    self.labels.append("numpy:" + "+".join(n.op_type for n in run) + (
                        "+(" + "+".join(n.op_type for n in sub) + ")" if sub else ""))
                    reads.append({n for node in (sub or []) + run for n in node.input})
                self.stats.numpy += len(group)
                continue
            for node in group:
                read = set(node.input)
                if kind == "packed":
                    self._steps.append(self._packed_step(node, kinds))
                    fusion = self._fusions.get(id(node))
                    self.labels.append(f"packed:{node.name}" + (
                        "+" + "+".join(n.op_type for n in fusion.nodes) if fusion else ""))
                    if fusion and fusion.sub:
                        key = plan_words_key(fusion.x, fusion.sub)
                        if key in words_reader:
                            read.add(key)
                else:
                    self._steps.append(self._numpy_step(node))
                    self.labels.append(f"numpy:{node.op_type}")
                reads.append(read)
            setattr(self.stats, kind, getattr(self.stats, kind) + len(group))
        self._free_after = last_reads(reads, {self.output})
        # Most of those names are values inside a fused conv or a chain that no run stores:
        # the first run learns which ones it held, later runs free those (about 550 names
        # against a few dozen: 0.3 ms of dictionary pops per cpu-base step), and a run that
        # holds another one at its end (a fallback's value) adds it where it dies.
        self._free_seen: list[list[str]] | None = None
        self._dies_at = {name: k for k, dead in enumerate(self._free_after) for name in dead}
        if keep_specs:
            self._specs = [(n.name, src, packed_conv_spec(n, self.consts))
                           for n, src in self._packed_nodes]
        else:
            self._specs = None
        # drop what keeps the graph proto (and the float weights) alive
        self.consts, self._consumers, self._packed_nodes, self._natives = {}, {}, [], {}
        self._chain_words = {}
        self._fusions = {}
    # -- steps ------------------------------------------------------------------------------
    def _packed_step(self, node, kinds) -> Callable[[StepValues], None]:
        fusion = self._fusions.get(id(node))
        conv = fusion.conv if fusion else node
        spec = packed_conv_spec(conv, self.consts)
        src, dst = (fusion.x, fusion.output) if fusion else (node.input[0], node.output[0])
        self._packed_nodes.append((conv, src))
        explicit = spec.pop("explicit_pads")
        packed = self._packed
        users = self._consumers.get(dst, [])
        keep_packed = bool(users) and dst != self.output and not (
            fusion and fusion.epilogue) and all(
            kinds[id(u)] == "packed" and u.input[0] == dst and dst not in u.input[1:]
            and not (id(u) in self._fusions and self._fusions[id(u)].sub)
            for u in users)
        layer = packed.PackedBinaryConv(
            spec.pop("weight"), threads=self.threads,
            thresholds=np.zeros(len(spec["scale"]), np.float32) if keep_packed else None,
            **spec)
        self.stats.packed_chained += keep_packed
        if not keep_packed:
            self._binary_out.add(conv.output[0])
        residual = fusion.residual if fusion else None
        # a float input read last here (not a feed) may give its buffer to the output: the
        # residual first (the kernel then adds it in place), else the packed input
        donor = None
        for name in (residual, src):
            if name and self._last_reader.get(name) == id(node) and name not in self.inputs \
                    and name != self.output and not keep_packed and name not in node.input[
                        len(node.input) - (fusion is not None and fusion.words_for is not None):]:
                donor = name
                break
        if fusion is None:
            def run(env: StepValues) -> None:
                words = env.words.get(src)
                if words is None:
                    words = (packed.pack_nhwc(env.nhwc[src]) if src in env.nhwc
                             else packed.pack_nchw(env.nchw[src]))
                if explicit is not None:
                    words = pad_words(words, explicit)
                if keep_packed:
                    env.words[dst] = layer.forward_packed(words)
                    return
                env.nhwc[dst] = layer(words, out=donated_buffer(env, donor, layer, words))
            return run
        return self._fused_run(fusion, layer, explicit, donor)

    def _fused_run(self, f, layer, explicit, donor) -> Callable[[StepValues], None]:
        consts = {n: self.consts[n] for n in (f.sub, f.zeta, f.slope, f.gamma)
                  if n and n in self.consts}
        return fused_conv_step(f, layer, explicit, donor, consts, self._packed)

    def _numpy_step(self, node) -> Callable[[StepValues], None]:
        if node.op_type == "Conv":  # edge_runtime.lut / edge_runtime.pointwise
            native, src, dst = self._natives[id(node)], node.input[0], node.output[0]
            if isinstance(native, LutConv):
                def run_lut(env: StepValues) -> None:
                    env.nhwc[dst] = native(env.get(src), threads=env.threads)
                return run_lut

            def run_pointwise(env: StepValues) -> None:
                env.nhwc[dst] = native(env.get_nhwc(src), threads=env.threads)
            return run_pointwise
        if node.op_type == shifted.OP:  # edge_runtime.shifted
            native, src, dst = self._natives[id(node)], node.input[0], node.output[0]

            def run_sum(env: StepValues) -> None:
                env.nhwc[dst] = native(env.get_nhwc(src), threads=env.threads)
            return run_sum
        if node.op_type == upadd.OP:  # edge_runtime.upadd
            native, (src, low), dst = self._natives[id(node)], node.input, node.output[0]
            emit = self._emit(dst)

            def run_upadd(env: StepValues) -> None:
                x, lo = env.get_nhwc(src), env.get_nhwc(low)
                sub = (channels_vector(emit[1](env), x.shape[0], native.conv.out_channels)
                       if emit and x.ndim == 4 else None)
                if sub is None:
                    env.nhwc[dst] = native(x, lo, threads=env.threads)
                else:  # also the next fused conv's packed input, in the same pass
                    env.nhwc[dst], env.words[emit[0]] = native(x, lo, threads=env.threads,
                                                               pack_sub=sub)
            return run_upadd
        if node.op_type == "Resize":  # edge_runtime.resize: a copy
            src, dst = node.input[0], node.output[0]

            def run_resize(env: StepValues) -> None:
                env.nhwc[dst] = resize.upsample_2x(env.get_nhwc(src))
            return run_resize
        if node.op_type == "AveragePool":  # edge_runtime.pool (a smaller output: no donors)
            src, dst = node.input[0], node.output[0]

            def run_pool(env: StepValues) -> None:
                env.nhwc[dst] = pool.average_pool_2x2(env.get_nhwc(src), threads=env.threads)
            return run_pool
        fn = nhwc.ELEMENTWISE[node.op_type]
        consts = [self.consts.get(name) for name in node.input]
        fixed = {i: nhwc.view(c) for i, c in enumerate(consts) if c is not None}
        names, dst = list(node.input), node.output[0]
        # inputs this node reads last, produced in the step (not a feed): their buffer may take
        # the result (in place: no allocation, no page faults; ~30 % faster measured)
        donors = [n for i, n in enumerate(names) if i not in fixed and n
                  and self._last_reader.get(n) == id(node) and n not in self.inputs
                  and n != self.output and names.count(n) == 1]

        def run(env: StepValues) -> None:
            args = [fixed[i] if i in fixed else env.get_nhwc(n) for i, n in enumerate(names)]
            out = None
            for n in donors if env.donate else ():
                buf = env.nhwc.get(n)
                if buf is not None and buf.flags.c_contiguous and buf.flags.writeable and \
                        buf.dtype == np.float32 and buf.shape == np.broadcast_shapes(
                            *(a.shape for a in args)):
                    out = buf
                    break
            env.nhwc[dst] = fn(*args, out=out)
        return run

    def _chain_step(self, run: list, sub: list | None = None) -> Callable[[StepValues], None]:
        """``run`` as one native pass; ``sub``: a lookup chain computed in it
        (:func:`edge_runtime.chain.merge_lookups`)."""
        nodes = (sub or []) + run
        fixed = {name: nhwc.view(self.consts[name]) for node in nodes for name in node.input
                 if name in self.consts}
        ids = {id(node) for node in nodes}
        inner = {node.output[0] for node in nodes if node is not run[-1]}
        donors = [n for node in nodes for n in node.input
                  if n and n not in fixed and n not in inner and self._last_reader.get(n) in ids
                  and n not in self.inputs and n != self.output]

        def operands(env: StepValues, node, skip: tuple) -> list:
            return [None if n in skip else fixed[n] if n in fixed else env.get_nhwc(n)
                    for n in node.input]
        return chain_step(run, operands, list(dict.fromkeys(donors)),
                          [self._numpy_step(node) for node in nodes],
                          self._natives.get(id(run[0])), self._emit(run[-1].output[0]),
                          (sub, self._natives[id(sub[0])]) if sub else None)

    def _emit(self, value: str) -> tuple[str, Callable] | None:
        """``(words key, sub(env))`` when a fused conv packs ``value`` after its TB ``Sub``
        (a constant or a feed): its producer may write those words in the same pass."""
        emit = self._chain_words.get(value)
        if emit is None:
            return None
        sub = self.consts.get(emit[1])
        return emit[0], (lambda env, name=emit[1], value=sub:
                         env.get(name) if value is None else value)

    def _ort_step(self, model, group, split: RefinerSplit, kinds) -> Callable[[StepValues], None]:
        produced = {o for node in group for o in node.output}
        inputs: list[str] = []
        for node in group:
            for name in node.input:
                if name and name not in produced and name not in inputs and (
                        split.kinds.get(name) != "const"):
                    inputs.append(name)
        in_group = {id(n) for n in group}
        outputs, nhwc_out, nchw_out = [], set(), set()
        for node in group:
            for o in node.output:
                users = [u for u in self._consumers.get(o, []) if id(u) not in in_group]
                if any(kinds[id(u)] != "ort" for u in users) and _rank(split, o) == 4:
                    nhwc_out.add(o)
                if any(kinds[id(u)] == "ort" for u in users) or o == self.output or (
                        o not in nhwc_out and users):
                    nchw_out.add(o)
                if o in nhwc_out or o in nchw_out:
                    outputs.append(o)
        nhwc_in = {n for n in inputs if self._kind_of.get(n) in ("packed", "numpy")}
        sub = submodel(model, group, inputs, outputs, split.kinds, split.types,
                       f"cluster_{len(self._steps)}")
        sub = with_channels_last(sub, nhwc_in, nhwc_out, set(outputs) - nchw_out)
        # pieces without convolutions (the X-Former on 8 x 8 tokens, the head's shifted sum)
        # are too small to split: with 2 threads they took longer (1.01 against 0.83 ms)
        threads = self.threads if any(n.op_type in _SPLIT_OPS for n in group) else 1
        session = make_session(sub, threads)
        out_names = [o.name for o in sub.graph.output]
        feed_names = [(n + "__nhwc" if n in nhwc_in else n, n) for n in inputs]

        def run(env: StepValues) -> None:
            feeds = {key: (env.get_nhwc(n) if n in nhwc_in else env.get(n))
                     for key, n in feed_names}
            for name, value in zip(out_names, session.run(out_names, feeds), strict=True):
                if name.endswith("__nhwc"):
                    env.nhwc[name[:-6]] = value
                else:
                    env.nchw[name] = value
        return run

    # -- running ----------------------------------------------------------------------------
    def _execute(self, feeds: dict[str, np.ndarray], *, keep: bool = False,
                 times: list[float] | None = None) -> StepValues:
        env = StepValues(self.threads, self._feed_cache, donate=not keep)
        nchw, nhwc, words = env.nchw, env.nhwc, env.words
        for name, value in feeds.items():
            (nhwc if name in self.nhwc_feeds else nchw)[name] = value
        clock = time.perf_counter
        learn = not keep and self._free_seen is None
        frees = self._free_after if learn or keep else self._free_seen
        seen: list[list[str]] = [[] for _ in frees] if learn else []
        for k, (step, dead) in enumerate(zip(self._steps, frees, strict=True)):
            start = clock() if times is not None else 0.0
            step(env)
            if times is not None:
                times.append(clock() - start)
            if keep:
                continue
            for name in dead:
                if name in feeds and name in nhwc and name not in self.nhwc_feeds:
                    # a converted feed: keep per image
                    self._feed_cache[name] = (feeds[name], nhwc[name])
                held = [d.pop(name, None) for d in (nchw, nhwc, words)]
                if learn and (name in feeds or any(v is not None for v in held)):
                    seen[k].append(name)
        if learn:
            self._free_seen = seen
        elif not keep:
            for d in (nchw, nhwc, words):
                for name in d:
                    k = self._dies_at.get(name)
                    if k is not None and name not in self._free_seen[k]:
                        self._free_seen[k].append(name)
        return env

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The step's output for ``feeds`` (``y_t`` and the boundary values, NCHW but those
        named in ``nhwc_feeds``, NHWC)."""
        return self._execute(feeds).get(self.output)

    def forget_image(self) -> None:
        """Drop the per-image NHWC copies of the static values."""
        self._feed_cache.clear()

    def profile(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, float]]:
        """(label, seconds) of every scheduled step of one run."""
        times: list[float] = []
        self._execute(feeds, times=times)
        return list(zip(self.labels, times, strict=True))

    def binary_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The float output of every packed conv of one step (NCHW), for checks against ORT."""
        env = self._execute(feeds, keep=True)
        return {name: env.get(name) for name in self._binary_out}

    def binary_layers(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, tuple, dict]]:
        """``(node name, NCHW input shape, packed layer arguments)`` of every packed conv, in
        execution order (the benchmark's per-layer table)."""
        if self._specs is None:
            raise ValueError("build the executor with keep_specs=True")
        env = self._execute(feeds, keep=True)
        out = []
        for name, src, spec in self._specs:
            if src in env.nchw or src in env.nhwc:
                shape = tuple(env.get(src).shape)
            else:  # chained: the producer's output shape
                shape = tuple(env.words[src].shape[:3])
                shape = (shape[0], -1, shape[1], shape[2])
            out.append((name, shape, dict(spec)))
        return out


def _rank(split: RefinerSplit, name: str) -> int | None:
    t = split.types.get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return len(t.tensor_type.shape.dim)
