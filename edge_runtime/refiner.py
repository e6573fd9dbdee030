"""One refiner step, split into what is computed per image, per step value and per step.

:class:`RefinerRunner` loads ``refiner_step.onnx`` (or the fp twin), rewrites its real-valued
layers into cheaper equivalents (:mod:`edge_runtime.rewrite`; ``rewrite=False`` keeps the graph
as exported), splits it
(:func:`edge_runtime.graph.split_refiner`) and runs

- the *static* part once per image chunk (``prepare``): image/prior/feature-only work such as
  the image half of the stem convolution and the feature-injection convolutions (or, given
  ``static_graph``, the int8 graph of that part made by :mod:`edge_runtime.quantize`);
- the *step* part once per (original step, batch size), cached across images: the folded
  per-step tables gathered by ``step``;
- the *dynamic* part at every reverse step: with the ``onnxruntime`` backend one ORT session,
  with the ``packed`` backend the :class:`~edge_runtime.executor.StepExecutor` (binary convs on
  the native kernel), a batch in chunks of :data:`CHUNK_BYTES` per map.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .export_format import META_PREFIX
from .graph import STEP_INPUT, content_digest, split_refiner, with_channels_last
from .ortutil import make_session
from .rewrite import RewriteStats, rewrite_refiner

__all__ = ["BACKENDS", "RefinerRunner", "StaticGraphError"]

BACKENDS = ("packed", "onnxruntime")


#: The packed step runs a batch (the S chains of an image) in chunks of at most this many bytes
#: per full-resolution map. A larger map is above glibc's mmap threshold (at most 32 MiB), so
#: each one comes from fresh pages the kernel zeroes: cpu-base at 256 x 256, one 4-chain step
#: took 86 ms as one batch (32 MiB maps), 79.5 ms in two chunks of 2 (16 MiB), 82 ms one chain
#: at a time; the results are the same bits (each chain is computed alone either way).
CHUNK_BYTES = 16 << 20


class StaticGraphError(ValueError):
    """An int8 static part (``static_graph``) that this runtime cannot use in place of its own:
    made from another split of the refiner, or not loadable."""


def _replacement(graph: Any, part: Any) -> Any:
    """``graph`` (an int8 static part) checked against this runtime's static ``part``: the same
    interface, and made from a part computing what this one computes (its
    ``hidiff.quantization`` record's ``static_part_sha256``,
    :func:`edge_runtime.graph.content_digest`)."""
    again = "run hidiff-edge quantize --overwrite again"
    inputs = sorted(i.name for i in graph.graph.input)
    outputs = sorted(o.name for o in graph.graph.output)
    if part.model is None or (inputs, outputs) != (sorted(part.inputs), sorted(part.outputs)):
        raise StaticGraphError(f"its signature {inputs} -> {outputs} is not this runtime's "
                               f"static part {sorted(part.inputs)} -> {sorted(part.outputs)} "
                               f"(made by another version); {again}")
    meta = {p.key: p.value for p in graph.metadata_props}
    try:
        recorded = json.loads(meta.get(META_PREFIX + "quantization", "{}")).get(
            "static_part_sha256")
    except (ValueError, AttributeError):
        recorded = None
    if recorded != content_digest(part.model):
        raise StaticGraphError(f"it was made from a static part that computes something else "
                               f"than this runtime's (static_part_sha256 {recorded!r}); {again}")
    copy = type(graph)()
    copy.CopyFrom(graph)  # with_channels_last edits the graph it is given
    return copy


class RefinerRunner:
    """The refiner step of one exported graph for one backend (see the module docstring)."""

    def __init__(self, proto: Any, *, backend: str, threads: int = 1,
                 keep_specs: bool = False, rewrite: bool = True,
                 static_graph: Any = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if static_graph is not None and not rewrite:
            raise ValueError("static_graph is a part of the rewritten graph; it needs "
                             "rewrite=True")
        self.backend = backend
        self.threads = threads
        self.rewrites = RewriteStats()
        if rewrite:
            proto, self.rewrites = rewrite_refiner(proto)
        self.split = split = split_refiner(proto)
        executor = None
        if backend == "packed":
            from .executor import StepExecutor

            executor = StepExecutor(proto, split, threads=threads, keep_specs=keep_specs)
            # the static part's maps that the packed step reads only in NHWC come out of
            # onnxruntime in NHWC (its layout reorder writes them so), not NCHW to be
            # transposed once per image (3 ms of 21 per cpu-base image)
            executor.nhwc_feeds = executor.nhwc_capable & set(split.static.outputs)
        static = split.static.model
        if static_graph is not None:
            static = _replacement(static_graph, split.static)
        self._static_names = list(split.static.outputs)
        if static is not None and executor is not None and executor.nhwc_feeds:
            static = with_channels_last(static, set(), set(executor.nhwc_feeds),
                                        set(executor.nhwc_feeds))
            self._static_names = [n + "__nhwc" if n in executor.nhwc_feeds else n
                                  for n in split.static.outputs]
        try:
            self._static = make_session(static, threads) if static is not None else None
        except Exception as err:  # noqa: BLE001 - onnxruntime's own errors
            if static_graph is None:
                raise
            raise StaticGraphError(f"onnxruntime cannot load it ({type(err).__name__}: "
                                   f"{err})") from err
        self._step = (make_session(split.step.model, threads)
                      if split.step.model is not None else None)
        self._step_cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        if executor is not None:
            self.executor = executor
            self._dynamic = None
        else:
            self.executor = None
            self._dynamic = make_session(split.dynamic.model, threads)
        self._dynamic_inputs = list(split.dynamic.inputs)
        for part in (split.static, split.step, split.dynamic):
            # the sessions hold what they need; node references would keep the proto alive
            part.model, part.nodes = None, []

    @property
    def static_inputs(self) -> list[str]:
        """The graph inputs the static part and the pass-through values need."""
        names = list(self.split.static.inputs)
        for n in self.split.passthrough:
            if n not in names and n != STEP_INPUT:
                names.append(n)
        return names

    @property
    def batch_shared(self) -> frozenset[str]:
        """Per-image values the step broadcasts over the batch (packed backend: those read only
        by its NumPy elementwise nodes): for one image, one copy serves all its chains."""
        if self.executor is None:
            return frozenset()
        return frozenset(self.executor.broadcast_inputs)

    def prepare(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The per-image boundary values from the image, prior and features (NCHW; for the
        packed backend the maps its step reads only in NHWC, ``executor.nhwc_feeds``, NHWC)."""
        out = {n: values[n] for n in self.split.passthrough if n != STEP_INPUT}
        if self._static is not None:
            part = self.split.static
            results = self._static.run(self._static_names,
                                       {n: values[n] for n in part.inputs})
            out.update(zip(part.outputs, results, strict=True))
        if self.executor is not None:
            self.executor.forget_image()
        return out

    def step_values(self, step: int, batch: int) -> dict[str, np.ndarray]:
        """The per-step boundary values (cached per step value and batch size)."""
        key = (int(step), int(batch))
        cached = self._step_cache.get(key)
        if cached is None:
            steps = np.full(batch, step, dtype=np.int64)
            cached = {}
            if self._step is not None:
                part = self.split.step
                results = self._step.run(part.outputs, {STEP_INPUT: steps})
                cached.update(zip(part.outputs, results, strict=True))
            if STEP_INPUT in self.split.passthrough:
                cached[STEP_INPUT] = steps
            self._step_cache[key] = cached
        return cached

    def feeds(self, prepared: dict[str, np.ndarray], y_t: np.ndarray,
              step: int) -> dict[str, np.ndarray]:
        values = {"y_t": np.ascontiguousarray(y_t, dtype=np.float32), **prepared,
                  **self.step_values(step, y_t.shape[0])}
        return {n: values[n] for n in self._dynamic_inputs}

    def __call__(self, prepared: dict[str, np.ndarray], y_t: np.ndarray,
                 step: int) -> np.ndarray:
        """The refiner's output probabilities (float32) for ``y_t`` at original ``step``."""
        feeds = self.feeds(prepared, y_t, step)
        if self.executor is None:
            return self._dynamic.run(None, feeds)[0]
        n = y_t.shape[0]
        chunk = self.chunk_size(feeds, n)
        if chunk >= n:
            return self.executor.run(feeds)
        return np.concatenate([
            self.executor.run({k: v[a:a + chunk] if v.ndim and v.shape[0] == n else v
                               for k, v in feeds.items()}) for a in range(0, n, chunk)])

    @staticmethod
    def chunk_size(feeds: dict[str, np.ndarray], n: int) -> int:
        """How many of a batch of ``n`` the packed step runs at a time: as many as keep a
        map the size of its largest per-image input within :data:`CHUNK_BYTES`, at least 1."""
        per_item = max((v.nbytes // v.shape[0] for v in feeds.values()
                        if v.ndim == 4 and v.shape[0]), default=0)
        return max(1, CHUNK_BYTES // per_item) if per_item else n
