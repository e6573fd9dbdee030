"""Predict masks for image files with a trained model folder.

:func:`predict_paths` takes image files and/or folders (a folder contributes its image files,
``*.png *.jpg *.jpeg *.tif *.tiff *.bmp *.gif``, not recursively, in natural order) and writes
one PNG mask per image to ``out/<stem>.png`` at the image's original size: 0/255 for a binary
model (K = 1), the label values 0..K-1 for a multi-class one; with ``uncertainty`` also
``out/<stem>_uncertainty.png``, the per-pixel spread of the S chains (0 = all agree).

Before anything is written every input is decoded once, so an unreadable file, a grayscale image
where the model expects RGB, an empty folder, a missing path or two inputs with the same stem
fail up front with an error naming the file (``hidiff.data.DataError``, a ``ValueError``, or
``FileNotFoundError``). Each mask is written to a temporary name in ``out`` and renamed, so a
crash never leaves a torn PNG; if ``out`` (or any of its parents) was created by this call and
nothing was written when an error occurs, the created folders are removed again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import reference
from hidiff.data.errors import DataError, preview
from hidiff.data.io import read_image
from hidiff.data.readers import IMAGE_SUFFIXES, natural_key
from hidiff.evaluation import pipeline_from_model_dir

__all__ = ["collect_images", "mask_to_png_array", "predict_paths", "write_png"]


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs`` (files as given, folders expanded); checked unique."""
    if not inputs:
        raise ValueError("no input images given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                (p for p in path.iterdir()
                 if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda p: natural_key(p.name),
            )
            if not found:
                wanted = " ".join("*" + s for s in IMAGE_SUFFIXES)
                raise DataError(path, f"no image files ({wanted}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    by_stem: dict[str, Path] = {}
    for path in files:
        other = by_stem.setdefault(path.stem, path)
        if other != path:
            raise DataError(path, f"has the same name stem as {other}; both would be written to "
                                  f"{path.stem}.png")
    return files


def mask_to_png_array(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """A uint8 label map as the PNG pixels: 0/255 for K = 1, the labels themselves for K > 1."""
    mask = np.asarray(mask, dtype=np.uint8)
    return mask * np.uint8(255) if num_classes == 1 else mask


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write a grey PNG atomically (temporary name in the same folder, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def predict_paths(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    *,
    out: str | Path,
    steps: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    refiner: str | None = "binary",
    uncertainty: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write ``out/<stem>.png`` masks for the images in ``inputs``; returns the written paths.

    ``refiner``: ``"binary"`` (HiDiff), ``"fp"`` (the full-precision twin, when the folder has
    one) or ``"none"``/``None`` (the segmentor alone). ``steps`` / ``samples`` / ``seed``:
    sampling steps and chains averaged (defaults: the model's) and the seed of the uniforms
    (each image is predicted on its own with this seed). ``uncertainty``: also write
    ``out/<stem>_uncertainty.png``, the spread of y0_hat across the chains
    (:func:`reference.uncertainty_pixels`; all 0 for one chain or the segmentor alone).
    """
    model, pipe = pipeline_from_model_dir(model_dir)
    pipe.refiner_module(refiner)  # reject an unknown / unavailable refiner before reading anything
    pipe.sampler(steps, samples)  # validate steps and samples up front
    files = collect_images(inputs)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output path exists and is not a folder")
    targets = [out_dir / f"{p.stem}.png" for p in files]
    extra = [out_dir / f"{p.stem}_uncertainty.png" for p in files] if uncertainty else []
    names = [t.name for t in targets + extra]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{out_dir / dup}: two outputs of this run would have this name; rename "
                         f"one of the inputs")
    clash = [str(p) for p in files for t in targets + extra if t.resolve() == p.resolve()]
    if clash:
        raise ValueError(f"{clash[0]}: would be overwritten by its own mask; choose another "
                         f"output folder ({preview(clash)})")
    channels = model.config.in_channels
    for path in files:  # decode everything once before writing anything
        read_image(path, channels)

    created = _missing_folders(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        bar = tqdm(list(zip(files, targets, strict=True)), desc="predict", unit="image",
                   disable=not progress, leave=False)
        for path, target in bar:
            image = read_image(path, channels)
            pred = pipe.predict_image(image, steps=steps, samples=samples, seed=seed,
                                      refiner=refiner)
            pixels = mask_to_png_array(pred.mask, model.config.num_classes)
            written.append(write_png(target, pixels))
            if uncertainty:
                spread_png = target.with_name(f"{path.stem}_uncertainty.png")
                written.append(write_png(spread_png, reference.uncertainty_pixels(pred.spread)))
    except BaseException:
        if not written:
            for folder in created:  # deepest first; only the (empty) folders made here
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise
    return written


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its missing ancestors that ``mkdir(parents=True)`` would create."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing
