"""The int8 graphs in ``benchmarks/edge.py``: a quantized copy of the benchmark's export (int8
segmentor and refiner static part) and (``--dice-model``) their Dice change on a real test split.

Calibration always uses training images (the first ``CALIBRATION_IMAGES`` of the dataset's
committed ``train`` subset, natural order), never the images scored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["CALIBRATION_IMAGES", "PRECISIONS", "dice_change", "int8_copy", "split_files"]

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_IMAGES = 32
#: what ``dice_change`` scores: name -> (segmentor, refiner_static) precisions
PRECISIONS = {"fp32": ("fp32", "fp32"), "int8": ("int8", "fp32"),
              "int8_static": ("fp32", "int8"), "int8_all": ("int8", "int8")}


def split_files(data: Path, subset: str, dataset: str = "kvasir-seg") -> list[tuple[Path, Path]]:
    """``(image, mask)`` of a committed subset of Kvasir-SEG (hidiff/splits), [] without data."""
    ids = json.loads((ROOT / "hidiff" / "splits" / f"{dataset}.json").read_text())["subsets"][
        subset]
    root = data / "Kvasir-SEG"
    pairs = [(root / "images" / f"{i}.jpg", root / "masks" / f"{i}.jpg") for i in ids]
    return [p for p in pairs if p[0].is_file()]


def int8_copy(export: Path, data: Path, work: Path, max_images: int) -> Path:
    """A copy of ``export`` with ``segmentor_int8.onnx`` and ``refiner_static_int8.onnx``
    calibrated on training images (random images when the data is absent)."""
    from PIL import Image

    from edge_runtime.quantize import quantize_model

    out = work / "export_int8"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(export, out)
    calib = work / "calibration"
    calib.mkdir(exist_ok=True)
    train = split_files(data, "train")[:max_images]
    for image, _ in train:
        target = calib / image.name
        if not target.exists():
            os.symlink(image, target)
    if not train:
        rng = np.random.default_rng(0)
        for i in range(max_images):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
                calib / f"random{i}.png")
    quantize_model(out, images_from=[calib], max_images=max_images, overwrite=True)
    return out


def dice_change(export: Path, data: Path, *, subset: str = "test", threads: int = 1) -> dict:
    """Mean Dice (``reference.metrics``) of HiDiff and of its segmentor alone, all fp32 against
    the int8 segmentor, the int8 refiner static part and both (:data:`PRECISIONS`), over a
    committed subset of Kvasir-SEG (one ``predict`` per image, seed 0); and
    HiDiff with the refiner step as exported (no :mod:`edge_runtime.rewrite`): its Dice and the
    mask pixels where it differs from the rewritten step's (float rounding only)."""
    import reference
    from edge_runtime import HiDiffSession
    from edge_runtime.cli_io import read_labels
    from edge_runtime.images import as_float_image, read_image
    from edge_runtime.model import load_model
    from edge_runtime.refiner import RefinerRunner

    pairs = split_files(data, subset)
    if not pairs:
        raise FileNotFoundError(f"{data / 'Kvasir-SEG'}: no Kvasir-SEG images for --dice-model")
    with tempfile.TemporaryDirectory() as tmp:
        quantized = int8_copy(export, data, Path(tmp), CALIBRATION_IMAGES)
        out = {"export": str(export), "subset": subset, "cases": len(pairs),
               "calibration_images": CALIBRATION_IMAGES}
        masks: dict[str, list] = {"fp32": [], "as_exported": []}
        for precision in (*PRECISIONS, "as_exported"):
            seg, static = PRECISIONS.get(precision, ("fp32", "fp32"))
            session = HiDiffSession(quantized, segmentor=seg, refiner_static=static,
                                    threads=threads)
            if precision == "as_exported":  # the refiner step without edge_runtime.rewrite
                session.refiner = RefinerRunner(load_model(quantized).protos["refiner_step"],
                                                backend=session.backend, threads=threads,
                                                rewrite=False)
            scores = {"hidiff": [], "segmentor": []}
            for image, mask in pairs:
                rgb = read_image(image, session.facts.in_channels)
                gt = read_labels(mask, session.facts.num_classes)
                pred = session.predict(rgb, seed=0)
                if precision in masks:
                    masks[precision].append(pred.mask)
                prior = reference.predict_image(
                    as_float_image(rgb, session.facts.in_channels),
                    preprocessing=session.facts.preprocessing,
                    segment=lambda part, s=session: s._segment(part, 1), denoise=None,
                    sampler=None)
                for key, labels in (("hidiff", pred.mask), ("segmentor", prior.mask)):
                    scores[key].append(reference.metrics.dice(labels, gt))
            out[precision] = {k: float(np.nanmean(v)) for k, v in scores.items()}
        out["rewrite_mask_pixels_differing"] = int(sum(
            int((a != b).sum()) for a, b in zip(masks["fp32"], masks["as_exported"], strict=True)))
        out["mask_pixels"] = int(sum(m.size for m in masks["fp32"]))
        out["change"] = {k: out["int8"][k] - out["fp32"][k] for k in ("hidiff", "segmentor")}
        out["changes"] = {p: {k: out[p][k] - out["fp32"][k] for k in ("hidiff", "segmentor")}
                          for p in PRECISIONS if p != "fp32"}
    return out
