"""``HiDiffSession``: torch-free HiDiff inference on an exported model folder.

    from edge_runtime import HiDiffSession

    session = HiDiffSession("exported/")                 # packed backend where available
    pred = session.predict(image, steps=None, seed=0)    # image: HWC uint8 RGB or float [0, 1]
    pred.mask                                            # (H, W) uint8 at the image's size

Per image (docs/architecture.md, "Inference"): the segmentor runs once; the refiner's static part
once (:mod:`edge_runtime.refiner`); then the Bernoulli reverse process in NumPy with the
``reference`` math, float64 like :func:`reference.reverse_process` and the torch pipeline:
``u = reference.draw_uniforms(seed, prior.shape, n)``, ``y = u[0] < prior``, and per kept step
(decreasing original index) the refiner's output, ``y0_hat`` and the DDIM (or ancestral) mean,
``y = u[k + 1] < mean``; the mask is ``y0_hat > 0.5`` (K = 1) or the argmax (K > 1). Fed the same
network outputs, the masks are those of ``hidiff.pipeline.HiDiffPipeline`` for the same seed.

Whole images follow the model's preprocessing policy exactly as the torch pipeline does:
``resize`` (bilinear to the input size, mask back by nearest neighbour, maps bilinearly) or
``tile`` (native resolution, overlapping tiles in row-major order forming one batch for the
uniforms, the network run ``tile_batch`` tiles at a time, probabilities averaged, mask from the
average).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import reference

from . import images
from .errors import EdgeError
from .model import ExportedModel, load_model
from .ortutil import make_session
from .refiner import BACKENDS, RefinerRunner

__all__ = ["BACKENDS", "EdgePrediction", "HiDiffSession", "default_backend"]

REFINERS = {"binary": "refiner_step", "fp": "refiner_step_fp"}


@dataclass(frozen=True)
class EdgePrediction:
    """One image's result at its original size: ``mask`` (H, W) uint8 label map (0/1 for
    K = 1), ``prob`` (K, H, W) float32 final y0_hat, ``prior`` (K, H, W) float32."""

    mask: np.ndarray
    prob: np.ndarray
    prior: np.ndarray


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
        threads: intra-op threads of every session and kernel.
        refiner: ``"binary"`` (HiDiff) or ``"fp"`` (the full-precision twin, when exported).
        tile_batch: tiles per network run for tile-policy models.
    """

    def __init__(self, model_dir: str | Path, *, backend: str | None = None, threads: int = 1,
                 refiner: str = "binary", tile_batch: int = 4) -> None:
        backend = default_backend() if backend is None else backend
        if backend not in BACKENDS:
            raise EdgeError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if refiner not in REFINERS:
            raise EdgeError(f"refiner must be one of {', '.join(REFINERS)}; got {refiner!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EdgeError(f"threads must be an int >= 1; got {threads!r}")
        if backend == "packed" and default_backend() != "packed":
            raise EdgeError("backend 'packed' needs the native extension edge_runtime._packed "
                            "(build it: python setup.py build_ext --inplace)")
        role = REFINERS[refiner]
        self.model: ExportedModel = load_model(model_dir, roles=("segmentor", role))
        self.facts = facts = self.model.facts
        if facts.policy == "tile" and tuple(facts.input_size) != (facts.tile, facts.tile):
            raise EdgeError(f"{self.model.folder}: tile policy with tile {facts.tile} but the "
                            f"graphs take {facts.input_size}")
        self.backend, self.threads, self.refiner_name = backend, threads, refiner
        self.tile_batch = max(1, int(tile_batch))
        self._segmentor = make_session(self.model.files["segmentor"], threads)
        self._seg_outputs = [o.name for o in self._segmentor.get_outputs()]
        self.refiner = RefinerRunner(self.model.protos[role], backend=backend, threads=threads)
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

    def refine(self, x: np.ndarray, seg: dict[str, np.ndarray], uniforms: np.ndarray,
               schedule: reference.Schedule, trace: list | None = None) -> np.ndarray:
        """Final y0_hat (float64) of the reverse process on one chunk; ``uniforms`` (n, N, ...).

        ``trace`` (optional) receives ``(t, y_t, out, mean or None)`` per step (for checks)."""
        facts = self.facts
        prepared = self.refiner.prepare({"image": x, **seg})
        prior64 = seg["prior"].astype(np.float64)
        n = schedule.num_steps
        y = reference.bernoulli_sample(prior64, uniforms[0])
        for k, t in enumerate(range(n, 0, -1)):
            out = self.refiner(prepared, y.astype(np.float32), int(schedule.timesteps[t]))
            y0_hat = reference.y0_from_output(y, out, facts.parameterization)
            if t == 1:
                if trace is not None:
                    trace.append((t, y, out, None))
                return y0_hat
            mean = reference.step_mean(y, y0_hat, prior64, t, schedule, method=facts.sampler)
            if trace is not None:
                trace.append((t, y, out, mean))
            y = reference.bernoulli_sample(mean, uniforms[k + 1])
        raise AssertionError("unreachable")

    def predict_batch(self, x: np.ndarray, *, steps: int | None = None, seed: int = 0,
                      batch_size: int | None = None, trace: list | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mask (N, H, W) uint8, prob (N, K, H, W) float64, prior (N, K, H, W) float32)`` of
        normalised images ``x`` (N, C, H, W) at the model's input size; uniforms for the whole
        batch, the networks on ``batch_size`` images at a time."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        expected = (self.facts.in_channels, *self.facts.input_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise EdgeError(f"x must be (N, {', '.join(map(str, expected))}); got {x.shape}")
        kept = self.sampling_steps(steps)
        schedule = reference.respace(self._schedule, kept)
        chunk = x.shape[0] if batch_size is None else max(1, int(batch_size))
        shape = (x.shape[0], self.facts.num_classes, *self.facts.input_size)
        uniforms = reference.draw_uniforms(int(seed), shape, len(kept))
        probs, priors = [], []
        for start in range(0, x.shape[0], chunk):
            part = x[start:start + chunk]
            seg = self.segment(part)
            u = uniforms[:, start:start + chunk]
            probs.append(self.refine(part, seg, u, schedule, trace))
            priors.append(seg["prior"])
        prob = np.concatenate(probs)
        return _labels(prob), prob, np.concatenate(priors)

    # -- whole images -----------------------------------------------------------------------
    def predict(self, image: np.ndarray, *, steps: int | None = None,
                seed: int = 0) -> EdgePrediction:
        """Predict one HWC image (uint8 RGB or float in [0, 1]) at its original size."""
        facts = self.facts
        image = images.as_float_image(image, facts.in_channels)
        height, width = image.shape[:2]
        if facts.policy == "tile":
            return self._predict_tiled(image, steps=steps, seed=seed)
        h, w = facts.input_size
        small = images.normalize(images.resize_planes(image, h, w), facts.mean, facts.std)
        x = np.ascontiguousarray(np.moveaxis(small, -1, 0))[None]
        mask, prob, prior = self.predict_batch(x, steps=steps, seed=seed)
        return EdgePrediction(
            images.resize_labels(mask[0], height, width),
            _resize_maps(prob[0], height, width),
            _resize_maps(prior[0], height, width),
        )

    def _predict_tiled(self, image: np.ndarray, *, steps: int | None,
                       seed: int) -> EdgePrediction:
        facts = self.facts
        height, width = image.shape[:2]
        normalised = images.normalize(image, facts.mean, facts.std)
        tiles, starts = images.extract_tiles(normalised, facts.tile, facts.overlap)
        x = np.ascontiguousarray(np.moveaxis(tiles, -1, 1))
        _, prob, prior = self.predict_batch(x, steps=steps, seed=seed,
                                            batch_size=self.tile_batch)
        prob = images.stitch_tiles(prob, starts, (height, width))
        prior = images.stitch_tiles(prior, starts, (height, width))
        mask = _labels(prob[None])[0]
        return EdgePrediction(mask, prob.astype(np.float32), prior.astype(np.float32))

    def describe(self) -> dict:
        """What runs where (for ``hidiff-edge info``)."""
        info = {"backend": self.backend, "refiner": self.refiner_name,
                "threads": self.threads}
        if self.refiner.executor is not None:
            info["plan"] = self.refiner.executor.stats
        return info


def _labels(prob: np.ndarray) -> np.ndarray:
    """(N, K, H, W) -> (N, H, W) uint8: ``> 0.5`` for K = 1, argmax for K > 1."""
    if prob.shape[1] == 1:
        return (prob[:, 0] > 0.5).astype(np.uint8)
    return np.argmax(prob, axis=1).astype(np.uint8)


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    hwc = np.moveaxis(maps.astype(np.float32), 0, -1)
    return np.ascontiguousarray(np.moveaxis(images.resize_planes(hwc, height, width), -1, 0))
