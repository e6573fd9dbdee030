"""Check an exported folder: integrity, onnxruntime against torch, onnxruntime against the ONNX
reference evaluator; report the maximum absolute difference per output.

    report = verify_export("exported/", model="runs/kvasir", data="../shared/data/Kvasir-SEG")
    print(report.format()); assert report.passed

Inputs: real images when ``data`` is given (an image file, a folder of images, or a dataset root
with an ``images/`` folder; read, resized to the model's input size and normalised as the manifest
says), else seeded standard-normal images. The segmentor graph runs on them; its ORT outputs are
the refiner inputs of both sides (so each graph is compared on identical inputs), with
``y_t = u < prior`` and a different sampling step per sample.

Tolerances (``tolerance = atol + rtol * max|expected|``; an output passes when at most
``allowed`` of its elements differ by more than the tolerance):

* ``prior``: atol 1e-4, allowed 0. Same float32 convolutions in another order; measured 2e-7 -
  3e-5 (large logits).
* ``feature_i``: rtol 1e-5 of the largest feature magnitude (unnormalised activations), allowed 0.
* ``probabilities``: atol 1e-3, judged per *case* (one sample at one step), not per element.
  Binary layers are exact given the same input, but the real layers before them round
  differently, and an input within rounding of 0 binarizes the other way; in a trained binary
  U-Net one such flip cascades through the later layers. A case either agrees everywhere to
  ~1e-6 or carries such a cascade (measured on a trained cpu-small Kvasir-SEG model, 4 real
  images x 10 steps: 9 of 10 steps agree to 3e-7, one step differs by up to 0.07 on 8 % of its
  elements; torch against itself with a 1-ulp change of the image shows the same kind of
  cascades). A wrong export (a misfolded table, scale or weight) moves every case. The output
  passes when at most half of the cases differ beyond the tolerance.
* ORT vs ``onnx.reference.ReferenceEvaluator``: the same tolerances.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.reference

import reference
from export.loading import load_model
from export.metadata import sha256_file
from reference import files as ref_files
from reference.images import normalize, resize_planes

__all__ = [
    "TOLERANCES",
    "Comparison",
    "VerifyReport",
    "load_images",
    "ort_session",
    "verify_export",
]

#: output kind -> (atol, rtol, allowed fraction of elements over tolerance); see the docstring
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "prior": (1e-4, 0.0, 0.0),
    "feature": (0.0, 1e-5, 0.0),
    "probabilities": (1e-3, 0.0, 0.5),  # allowed fraction of *cases*, see the docstring
}
#: outputs judged per case (one sample at one step) rather than per element
_PER_CASE = ("probabilities",)


def tolerance_for(output: str, expected: np.ndarray) -> tuple[float, float]:
    """``(tolerance, allowed fraction)`` for ``output`` given its reference values."""
    kind = "feature" if output.startswith("feature_") else output
    atol, rtol, allowed = TOLERANCES[kind]
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return atol + rtol * scale, allowed


@dataclass(frozen=True)
class Comparison:
    """One output of one graph, onnxruntime against ``against`` (torch or onnx.reference)."""

    graph: str
    output: str
    against: str
    max_abs_diff: float
    tolerance: float
    fraction_over: float = 0.0  # elements (or, for per-case outputs, cases) over tolerance
    allowed_fraction: float = 0.0
    cases: int = 0  # per-case outputs: number of (sample, step) cases compared
    cases_over: int = 0

    @property
    def passed(self) -> bool:
        return self.fraction_over <= self.allowed_fraction


@dataclass
class VerifyReport:
    out_dir: Path
    inputs: str
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.passed for c in self.comparisons)

    def max_diffs(self) -> dict[tuple[str, str, str], float]:
        return {(c.graph, c.output, c.against): c.max_abs_diff for c in self.comparisons}

    def format(self) -> str:
        lines = [f"verify {self.out_dir} ({self.inputs})"]
        lines += [f"  problem: {p}" for p in self.problems]
        for c in self.comparisons:
            mark = "ok  " if c.passed else "FAIL"
            over = f", {c.fraction_over:.2%} over" if c.fraction_over else ""
            if c.cases:
                over = (f", {c.cases_over} of {c.cases} cases over; allowed "
                        f"{c.allowed_fraction:.0%} (sign-flip cascades, see export.verify)")
            lines.append(
                f"  {mark} {c.graph:16s} {c.output:14s} ORT vs {c.against:15s} "
                f"max|diff| {c.max_abs_diff:.3g} (tol {c.tolerance:.3g}{over})"
            )
        lines.append("passed" if self.passed else "FAILED")
        return "\n".join(lines)


def ort_session(path_or_bytes):
    """A CPU onnxruntime session (warnings silenced)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_images(
    data: str | Path, *, size: int, mean, std, channels: int = 3, count: int = 2
) -> tuple[np.ndarray, list[str]]:
    """Up to ``count`` images from ``data`` as normalised float32 NCHW, and their file names."""
    from hidiff.data.io import read_image

    path = Path(data)
    if path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        files = ref_files.image_files(folder)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such image file or folder")
    if not files:
        raise ValueError(f"{path}: no images found")
    files = files[:count]
    arrays = [
        np.moveaxis(normalize(resize_planes(read_image(f, channels), size, size), mean, std), -1, 0)
        for f in files
    ]
    return np.stack(arrays).astype(np.float32), [f.name for f in files]


def _check_files(out_dir: Path, manifest: dict[str, Any], problems: list[str]) -> dict:
    models = {}
    for entry in manifest.get("files", []):
        path = out_dir / entry["name"]
        if not path.is_file():
            problems.append(f"{entry['name']}: listed in the manifest but missing")
            continue
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['name']}: size or sha256 differs from the manifest")
        model = onnx.load(str(path))
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as err:  # noqa: BLE001 - any checker failure is a problem to report
            problems.append(f"{entry['name']}: onnx.checker: {err}")
        models[entry["role"]] = (path, model)
    return models


def _compare(report, graph, names, got, expected, against) -> None:
    for name, a, b in zip(names, got, expected, strict=True):
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        tol, allowed = tolerance_for(name, np.asarray(b))
        if name in _PER_CASE and diff.size:
            case_over = (diff.reshape(diff.shape[0], -1) > tol).any(axis=1)
            cases, n_over = int(case_over.size), int(case_over.sum())
            report.comparisons.append(
                Comparison(graph, name, against, float(diff.max()), tol, n_over / cases,
                           allowed, cases, n_over))
            continue
        over = float(np.mean(diff > tol)) if diff.size else 0.0
        report.comparisons.append(
            Comparison(graph, name, against, float(diff.max(initial=0.0)), tol, over, allowed)
        )


def _refiner_feeds(seg_out, names, manifest, seed) -> list[dict[str, np.ndarray]]:
    prior = seg_out[0]
    timesteps = list(manifest["model"]["timesteps"])
    u = reference.draw_uniforms(seed, prior.shape, 1)[0]
    y_t = (u < prior).astype(np.float32)
    n = prior.shape[0]
    feeds = []
    for k in range(len(timesteps)):
        step = np.array([timesteps[(k + i) % len(timesteps)] for i in range(n)], dtype=np.int64)
        feed = {"y_t": y_t, "step": step}
        feed.update({name: value for name, value in zip(names, seg_out, strict=True)})
        feeds.append(feed)
    return feeds


def verify_export(
    out_dir: str | Path,
    *,
    model: Any = None,
    data: str | Path | None = None,
    batch: int = 2,
    seed: int = 0,
    max_steps: int | None = None,
    reference_evaluator: bool | None = None,
) -> VerifyReport:
    """Verify the exported folder ``out_dir`` (see the module docstring).

    Args:
        model: the model folder (path) or a loaded model (:class:`hidiff.training.LoadedModel`);
            without it only integrity and ORT vs the reference evaluator are checked.
        data: real images (file, folder or dataset root); else random images.
        batch: images per run; seed: for random images and the y_t draw.
        max_steps: compare the refiner at most at this many sampling steps (default all).
        reference_evaluator: also run ``onnx.reference.ReferenceEvaluator`` (slow on large
            models); default: only when no torch model is given.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not an exported folder (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    facts = manifest["model"]
    size = int(facts["input_size"][0])
    norm = facts["normalization"]
    if data is not None:
        images, names = load_images(data, size=size, mean=norm["mean"], std=norm["std"],
                                    channels=int(facts["in_channels"]), count=batch)
        source = f"{len(names)} image(s) from {data}"
    else:
        rng = np.random.Generator(np.random.PCG64(seed))
        images = rng.standard_normal((batch, facts["in_channels"], size, size)).astype(np.float32)
        source = f"{batch} random image(s), seed {seed}"
    report = VerifyReport(out_dir, source)
    models = _check_files(out_dir, manifest, report.problems)
    if "segmentor" not in models:
        report.problems.append("no segmentor graph")
        return report
    if isinstance(model, str | Path):
        model = load_model(model)
    use_reference = (model is None) if reference_evaluator is None else reference_evaluator

    seg_path, seg_model = models["segmentor"]
    seg_names = [o.name for o in seg_model.graph.output]
    seg_out = ort_session(seg_path).run(None, {"image": images})
    if model is not None:
        expected = _torch_segmentor(model, images)
        _compare(report, "segmentor", seg_names, seg_out, expected, "torch")
    if use_reference:
        ref_out = _reference_run(onnx.reference.ReferenceEvaluator(seg_model), {"image": images})
        _compare(report, "segmentor", seg_names, seg_out, ref_out, "onnx.reference")

    feeds = _refiner_feeds(seg_out, seg_names, manifest, seed)
    if max_steps is not None:
        feeds = feeds[: max(1, max_steps)]
    for role in ("refiner_step", "refiner_step_fp"):
        if role not in models:
            continue
        path, graph = models[role]
        session = ort_session(path)
        torch_refiner = None
        if model is not None:
            torch_refiner = model.refiner if role == "refiner_step" else model.refiner_fp
        evaluator = onnx.reference.ReferenceEvaluator(graph) if use_reference else None
        for feed in feeds:
            full = {"image": images, **feed}
            got = session.run(None, full)
            if torch_refiner is not None:
                expected = _torch_refiner(model, torch_refiner, full, seg_names)
                _compare(report, role, ["probabilities"], got, [expected], "torch")
            if evaluator is not None:
                _compare(report, role, ["probabilities"], got, _reference_run(evaluator, full),
                         "onnx.reference")
    report.comparisons = _worst_per_output(report.comparisons)
    return report


def _reference_run(evaluator, feed):
    # onnx.reference's Sigmoid evaluates exp on both branches of a where: harmless overflow
    with np.errstate(over="ignore", invalid="ignore"):
        return evaluator.run(None, feed)


def _worst_per_output(comparisons: list[Comparison]) -> list[Comparison]:
    """One comparison per (graph, output, against): the largest difference over the runs, the
    largest fraction of elements over tolerance (per-case outputs: the cases pooled)."""
    worst: dict[tuple[str, str, str], Comparison] = {}
    for c in comparisons:
        key = (c.graph, c.output, c.against)
        w = worst.get(key)
        if w is None:
            worst[key] = c
            continue
        cases, cases_over = w.cases + c.cases, w.cases_over + c.cases_over
        fraction = cases_over / cases if cases else max(w.fraction_over, c.fraction_over)
        worst[key] = Comparison(
            c.graph, c.output, c.against, max(w.max_abs_diff, c.max_abs_diff),
            min(w.tolerance, c.tolerance), fraction, c.allowed_fraction, cases, cases_over,
        )
    return list(worst.values())


def _torch_segmentor(model, images: np.ndarray) -> list[np.ndarray]:
    import torch

    from export.graphs import SegmentorGraph, refiner_feature_indices

    graph = SegmentorGraph(model.segmentor, refiner_feature_indices(model.refiner)).eval()
    with torch.no_grad():
        out = graph(torch.from_numpy(images))
    return [t.numpy() for t in out]


def _torch_refiner(model, refiner, feed: dict[str, np.ndarray], seg_names) -> np.ndarray:
    import torch

    from export.graphs import RefinerStepGraph, refiner_feature_indices

    indices = refiner_feature_indices(refiner)
    graph = RefinerStepGraph(refiner, indices, len(model.segmentor.feature_strides)).eval()
    features = [torch.from_numpy(feed[n]) for n in seg_names[1:]]
    args = [torch.from_numpy(feed[k]) for k in ("image", "y_t", "prior")]
    with torch.no_grad():
        out = graph(*args, *features, torch.from_numpy(feed["step"]))
    return out.numpy()
