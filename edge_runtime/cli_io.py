"""The pieces of ``hidiff-edge`` that touch files and text: inputs, labels, overlays, ``info``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from reference import files as ref_files
from reference import metrics
from reference.overlay import overlay

from .errors import InputError

__all__ = ["collect_images", "info_lines", "match_labels", "metrics_line", "overlay",
           "read_labels"]



def collect_images(inputs: Sequence[str | Path], *, unique_stems: bool = True) -> list[Path]:
    """:func:`reference.files.collect_images`, its problems as :class:`InputError`."""
    return ref_files.collect_images(inputs, error=InputError, unique_stems=unique_stems)


def match_labels(files: list[Path], folder: Path) -> dict[Path, Path]:
    """The ground-truth file of every image: same stem in ``folder`` (any image suffix)."""
    if not folder.is_dir():
        what = "is a file; --labels takes the folder of ground-truth masks" if folder.exists() \
            else "labels folder not found"
        raise InputError(folder, what)
    by_stem: dict[str, list[Path]] = {}
    for label in ref_files.image_files(folder):
        by_stem.setdefault(label.stem, []).append(label)
    out = {}
    for path in files:
        found = by_stem.get(path.stem, [])
        if not found:
            raise InputError(path, f"no ground-truth mask named {path.stem}.* in {folder}")
        if len(found) > 1:
            raise InputError(found[1], f"and {found[0].name} are both ground truth for "
                                       f"{path.name}; keep one")
        out[path] = found[0]
    return out


def read_labels(path: Path, num_classes: int) -> np.ndarray:
    """A ground-truth mask as a uint8 label map: for K = 1 a grey/colour mask thresholded
    (two-level lossless {0, v} -> v is 1, otherwise > half range, e.g. Kvasir's JPEGs)."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # the frame its image is read in
            if img.mode in ("RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr") and num_classes == 1:
                img = img.convert("L")
            array = np.asarray(img)
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InputError(path, f"unreadable mask ({type(err).__name__}: {err})") from err
    if array.ndim != 2:
        raise InputError(path, f"mask has shape {array.shape}; expected a 2-D label map")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if num_classes > 1:
        return array.astype(np.uint8)
    values = np.unique(array)
    lossless = path.suffix.lower() not in (".jpg", ".jpeg")
    if lossless and values.size <= 2 and values[0] == 0:
        return (array > 0).astype(np.uint8)
    half = 32767 if array.dtype == np.uint16 else 127
    return (array > half).astype(np.uint8)


def metrics_line(name: str, pred: np.ndarray, gt: np.ndarray) -> tuple[str, tuple[float, float]]:
    """``"<name>  dice D  hd95 H"`` and ``(D, H)``; K > 1: means over the foreground classes."""
    if pred.max(initial=0) <= 1 and gt.max(initial=0) <= 1:
        d, h = metrics.dice(pred, gt), metrics.hd95(pred, gt)
    else:
        per = metrics.multiclass(pred, gt, metrics=("dice", "hd95"))
        ds = [v["dice"] for v in per.values() if np.isfinite(v["dice"])]
        hs = [v["hd95"] for v in per.values() if np.isfinite(v["hd95"])]
        d = float(np.mean(ds)) if ds else float("nan")
        h = float(np.mean(hs)) if hs else float("nan")
    return f"{name}  dice {d:.4f}  hd95 {h:.2f}", (d, h)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def info_lines(session) -> list[str]:
    """What ``hidiff-edge info`` prints about a loaded :class:`HiDiffSession`."""
    model, facts = session.model, session.facts
    raw = model.manifest["model"]
    lines = [
        f"model folder     {model.folder}",
        f"format           {model.manifest['format']} v{model.manifest['format_version']} "
        f"(opset {model.manifest.get('opset')}, IR {model.manifest.get('ir_version')})",
        f"preset           {raw.get('preset', '?')}  dataset {raw.get('dataset', '?')}  "
        f"training step {raw.get('training_step', '?')}  commit "
        f"{str(raw.get('source_commit', '?'))[:12]}",
        f"task             K = {facts.num_classes}  labels {facts.labels}",
        f"diffusion        T = {facts.num_steps}  schedule {facts.schedule}  sampler "
        f"{facts.sampler}  parameterization {facts.parameterization}  offset {facts.offset}",
        f"sampling         {facts.sampling_steps} steps: {list(facts.timesteps)}, "
        f"{facts.sampling_samples} chain(s) averaged per image ({facts.sampling_estimate} "
        "estimate of each chain)",
        f"input            {facts.in_channels} x {facts.input_size[0]} x {facts.input_size[1]}"
        f"  normalization mean {list(facts.mean)} std {list(facts.std)}",
        f"preprocessing    {facts.policy}" + (
            f" (tile {facts.tile}, overlap {facts.overlap})" if facts.policy == "tile" else ""),
        f"binarization     {facts.binarization}",
        f"feature strides  {list(facts.feature_strides)}",
        "files:",
    ]
    total = 0
    for entry in model.manifest["files"]:
        path = model.folder / entry["name"]
        size = path.stat().st_size if path.is_file() else 0
        total += size
        ops = ", ".join(entry.get("custom_ops") or []) or "-"
        shown = _human(size) if path.is_file() else "missing"
        lines.append(f"  {entry['name']:<25} {entry['role']:<20} {shown:>10}  "
                     f"custom ops: {ops}")
    lines.append(f"  total {_human(total)}")
    lines.append(f"backend          {session.backend}  refiner {session.refiner_name}  segmentor "
                 f"{session.segmentor_name}  refiner static {session.refiner_static_name}  "
                 f"threads {session.threads}")
    try:
        from . import packed

        paths = packed.available_paths()
        lines.append(f"packed kernel    path {packed.current_path()} on this CPU "
                     f"(available: {', '.join(paths)})")
    except ImportError as err:
        lines.append(f"packed kernel    not available ({err})")
    described = session.describe()
    fired = ", ".join(f"{name} x{n}" for name, n in described["rewrites"].items() if n)
    lines.append(f"graph rewrites   {fired or 'none matched'} (edge_runtime.rewrite)")
    plan = described.get("plan")
    if plan is not None:
        lines.append(f"refiner step     {plan.packed} binary convs on the packed kernel "
                     f"({plan.packed_chained} chained packed), {plan.numpy} elementwise ops in "
                     f"NumPy, {plan.ort} ops in {plan.ort_sessions} onnxruntime pieces")
        for reason in plan.fallbacks:
            lines.append(f"  left to onnxruntime: {reason}")
    return lines
