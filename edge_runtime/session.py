"""``HiDiffSession``: torch-free HiDiff inference on an exported model folder.

    from edge_runtime import HiDiffSession

    session = HiDiffSession("exported/")                 # packed backend where available
    pred = session.predict(image, steps=None, seed=0)    # image: HWC uint8 RGB or float [0, 1]
    pred.mask, pred.spread                               # (H, W) uint8, (K, H, W) uncertainty

Per image (docs/architecture.md, "Inference") the session runs :func:`reference.predict_batch`,
the one predict loop the torch pipeline runs too; it only supplies the two network callables: the
segmentor plus the refiner's static part once per image chunk (:mod:`edge_runtime.refiner`),
repeated for the S chains, and one refiner step per reverse step on the chosen backend. The loop
draws ``reference.chain_uniforms(seed, prior.shape, n, S)``, runs S chains with the model's
offset and parameterisation, averages the chains' estimates (the model's ``sampling_estimate``:
each chain's last y0_hat or the mean over its steps; mask from the mean) and returns the spread
across chains as the uncertainty map. Fed the same network outputs, the masks are those of
``hidiff.pipeline.HiDiffPipeline`` for the same seed.

Whole images follow the model's preprocessing policy exactly as the torch pipeline does:
``resize`` (bilinear to the input size, mask back by nearest neighbour, maps bilinearly) or
``tile`` (native resolution, overlapping tiles in row-major order forming one batch for the
uniforms, the network run ``tile_batch`` tiles at a time, probabilities averaged, mask from the
average).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

import reference

from . import images
from .errors import EdgeError, ModelError
from .model import ExportedModel, load_model
from .ortutil import make_session
from .refiner import BACKENDS, RefinerRunner, StaticGraphError

__all__ = ["BACKENDS", "REFINER_STATICS", "SEGMENTORS", "EdgePrediction", "HiDiffSession",
           "default_backend"]

REFINERS = {"binary": "refiner_step", "fp": "refiner_step_fp"}
#: segmentor precision -> graph role (``int8``: made by ``hidiff-edge quantize``)
SEGMENTORS = {"fp32": "segmentor", "int8": "segmentor_int8"}
#: precision of the refiner's per-image (static) part -> graph role (None: the refiner's own)
REFINER_STATICS = {"fp32": None, "int8": "refiner_static_int8"}


#: one image's result at its own size (mask, prob, prior, spread): the reference's
EdgePrediction = reference.ImagePrediction


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cap_threads(threads: int) -> int:
    """``threads`` capped to :func:`usable_cpus`, with a ``RuntimeWarning`` when it is."""
    cpus = usable_cpus()
    if threads > cpus:
        warnings.warn(f"threads={threads} is more than the {cpus} CPU(s) this process may use; "
                      f"using {cpus}", RuntimeWarning, stacklevel=3)
        return cpus
    return threads


def default_backend() -> str:
    """``"packed"`` when the native extension imports, else ``"onnxruntime"``."""
    try:
        from . import packed  # noqa: F401
    except ImportError:
        return "onnxruntime"
    return "packed"


class HiDiffSession:
    """Segmentor + one refiner of an exported folder, ready to predict (module docstring).

    Args:
        model_dir: a folder written by ``hidiff export`` (manifest.json + ONNX graphs).
        backend: ``"packed"`` (binary convs on the native XNOR-popcount kernel; default where
            the extension is built) or ``"onnxruntime"`` (stock ORT, binary layers through
            their function bodies).
        threads: intra-op threads of every session and kernel; more than the CPUs this process
            may use are capped to that number, with a warning (oversubscribed threads run many
            times slower).
        refiner: ``"binary"`` (HiDiff) or ``"fp"`` (the full-precision twin, when exported).
        segmentor: ``"fp32"`` (default) or ``"int8"`` (the graph ``hidiff-edge quantize``
            adds; see :mod:`edge_runtime.quantize`).
        refiner_static: ``"fp32"`` (default) or ``"int8"``: the binary refiner's per-image part
            (its feature-injection convolutions) from the int8 graph ``hidiff-edge quantize``
            adds; the per-step work is the same either way.
        tile_batch: tiles per network run for tile-policy models.
    """

    def __init__(self, model_dir: str | Path, *, backend: str | None = None, threads: int = 1,
                 refiner: str = "binary", segmentor: str = "fp32",
                 refiner_static: str = "fp32",
                 tile_batch: int = reference.DEFAULT_TILE_BATCH) -> None:
        backend = default_backend() if backend is None else backend
        if backend not in BACKENDS:
            raise EdgeError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if refiner not in REFINERS:
            raise EdgeError(f"refiner must be one of {', '.join(REFINERS)}; got {refiner!r}")
        if segmentor not in SEGMENTORS:
            raise EdgeError(f"segmentor must be one of {', '.join(SEGMENTORS)}; "
                            f"got {segmentor!r}")
        if refiner_static not in REFINER_STATICS:
            raise EdgeError(f"refiner_static must be one of {', '.join(REFINER_STATICS)}; "
                            f"got {refiner_static!r}")
        static_role = REFINER_STATICS[refiner_static]
        if static_role is not None and refiner != "binary":
            raise EdgeError(f"refiner_static={refiner_static!r} is a part of the binary "
                            f"refiner; it needs refiner='binary', not {refiner!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EdgeError(f"threads must be an int >= 1; got {threads!r}")
        threads = cap_threads(threads)
        if backend == "packed" and default_backend() != "packed":
            raise EdgeError("backend 'packed' needs the native extension edge_runtime._packed "
                            "(build it: python setup.py build_ext --inplace)")
        role = REFINERS[refiner]
        seg_role = SEGMENTORS[segmentor]
        roles = (seg_role, role) if static_role is None else (seg_role, role, static_role)
        self.model: ExportedModel = load_model(model_dir, roles=roles)
        self.facts = facts = self.model.facts
        if facts.policy == "tile" and tuple(facts.input_size) != (facts.tile, facts.tile):
            raise EdgeError(f"{self.model.folder}: tile policy with tile {facts.tile} but the "
                            f"graphs take {facts.input_size}")
        self.backend, self.threads, self.refiner_name = backend, threads, refiner
        self.segmentor_name, self.refiner_static_name = segmentor, refiner_static
        self.tile_batch = max(1, int(tile_batch))
        self._segmentor = make_session(self.model.files[seg_role], threads)
        self._seg_outputs = [o.name for o in self._segmentor.get_outputs()]
        try:
            self.refiner = RefinerRunner(
                self.model.protos[role], backend=backend, threads=threads,
                static_graph=None if static_role is None else self.model.protos[static_role])
        except StaticGraphError as err:
            raise ModelError(self.model.files[static_role], str(err)) from err
        self.model.protos.clear()  # the sessions hold what they need
        self._schedule = reference.make_schedule(facts.schedule, facts.num_steps)

    # -- the batch path ---------------------------------------------------------------------
    def sampling_steps(self, steps: int | None) -> list[int]:
        """The kept original steps, increasing (``steps`` evenly spread, always with T)."""
        n = self.facts.sampling_steps if steps is None else steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not (
                1 <= n <= self.facts.num_steps):
            raise EdgeError(f"steps must be an int in 1..{self.facts.num_steps} (the model's T); "
                            f"got {n!r}")
        if steps is None and self.facts.timesteps:
            return sorted(self.facts.timesteps)
        return reference.spaced_steps(self.facts.num_steps, int(n))

    def segment(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Segmentor outputs (``prior`` and the features) of normalised ``x`` (N, C, H, W)."""
        outs = self._segmentor.run(self._seg_outputs, {"image": x})
        return dict(zip(self._seg_outputs, outs, strict=True))

    def sampler(self, steps: int | None = None, samples: int | None = None, *,
                estimate: str | None = None) -> reference.Sampler:
        """The sampling of this model: ``steps`` kept steps (default the model's),
        ``samples`` chains averaged per image (default the model's ``sampling_samples``) and
        each chain's ``estimate`` (default the model's ``sampling_estimate``)."""
        facts = self.facts
        s = facts.sampling_samples if samples is None else samples
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise EdgeError(f"samples must be an int >= 1; got {s!r}")
        try:
            e = reference.check_estimate(facts.sampling_estimate if estimate is None else estimate)
        except ValueError as err:
            raise EdgeError(str(err)) from None
        schedule = reference.respace(self._schedule, self.sampling_steps(steps))
        return reference.Sampler(schedule, method=facts.sampler,
                                 parameterization=facts.parameterization, offset=facts.offset,
                                 samples=int(s), estimate=e)

    def _segment(self, x: np.ndarray, samples: int):
        """``segment`` callable of :func:`reference.predict_batch`: the prior and the refiner's
        per-image values, repeated for the ``samples`` chains (chain-major)."""
        seg = self.segment(np.ascontiguousarray(x, dtype=np.float32))
        prepared = self.refiner.prepare({"image": x, **seg})
        if samples > 1:  # one image: values the step broadcasts stay one copy (measured: the
            # copies cost 20 of 239 ms per cpu-base image at 4 chains)
            shared = self.refiner.batch_shared if len(x) == 1 else frozenset()
            prepared = {k: v if k in shared else np.concatenate([v] * samples)
                        for k, v in prepared.items()}
        return seg["prior"], prepared

    def _denoise(self, prepared: dict[str, np.ndarray], y: np.ndarray, step: int) -> np.ndarray:
        return self.refiner(prepared, y.astype(np.float32), int(step))

    def predict_batch(self, x: np.ndarray, *, steps: int | None = None,
                      samples: int | None = None, seed: int = 0,
                      batch_size: int | None = None, trace: list | None = None,
                      estimate: str | None = None) -> reference.BatchPrediction:
        """:func:`reference.predict_batch` on normalised images ``x`` (N, C, H, W) at the model's
        input size: ``prob`` (the chains' mean estimate), ``spread`` (across chains), ``prior``;
        uniforms for the whole batch, the networks on ``batch_size`` images at a time; ``trace``
        as in :func:`reference.reverse_process`; ``estimate`` as in :meth:`sampler`."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected = (self.facts.in_channels, *self.facts.input_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise EdgeError(f"x must be (N, {', '.join(map(str, expected))}); got {x.shape}")
        sampler = self.sampler(steps, samples, estimate=estimate)
        return reference.predict_batch(
            x, segment=lambda part: self._segment(part, sampler.samples),
            denoise=self._denoise, sampler=sampler, seed=int(seed), batch_size=batch_size,
            trace=trace)

    # -- whole images -----------------------------------------------------------------------
    def predict(self, image: np.ndarray, *, steps: int | None = None,
                samples: int | None = None, seed: int = 0,
                estimate: str | None = None) -> EdgePrediction:
        """Predict one HWC image (uint8 RGB or float in [0, 1]) at its original size with
        :func:`reference.predict_image` (``estimate`` as in :meth:`sampler`)."""
        facts = self.facts
        image = images.as_float_image(image, facts.in_channels)
        sampler = self.sampler(steps, samples, estimate=estimate)
        return reference.predict_image(
            image, preprocessing=facts.preprocessing,
            segment=lambda part: self._segment(part, sampler.samples),
            denoise=self._denoise, sampler=sampler, seed=int(seed), tile_batch=self.tile_batch)

    def describe(self) -> dict:
        """What runs where (for ``hidiff-edge info``)."""
        info = {"backend": self.backend, "refiner": self.refiner_name,
                "segmentor": self.segmentor_name, "refiner_static": self.refiner_static_name,
                "threads": self.threads}
        info["rewrites"] = self.refiner.rewrites.counts()
        if self.refiner.executor is not None:
            info["plan"] = self.refiner.executor.stats
        return info

