"""Predict masks for image files with a trained model folder.

:func:`predict_paths` takes image files and/or folders (a folder contributes its image files,
``*.png *.jpg *.jpeg *.tif *.tiff *.bmp *.gif``, not recursively, in natural order) and writes
one PNG mask per image to ``out/<stem>.png`` at the image's original size: 0/255 for a binary
model (K = 1), the label values 0..K-1 for a multi-class one; with ``uncertainty`` also
``out/<stem>_uncertainty.png``, the per-pixel spread of the S chains (0 = all agree).

Before anything is written every input is decoded once, so an unreadable file, a grayscale image
where the model expects RGB, an empty folder, a missing path or two inputs with the same stem
fail up front with an error naming the file (``hidiff.data.DataError``, a ``ValueError``). Each
mask is written to a temporary name in ``out`` and renamed (:func:`reference.files.write_png`),
so a crash never leaves a torn PNG; if ``out`` (or any of its parents) was created by this call and
nothing was written when an error occurs, the created folders are removed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

import reference
from hidiff.data.errors import DataError, preview
from hidiff.data.io import read_image
from hidiff.evaluation import pipeline_from_model_dir
from reference import files

__all__ = ["collect_images", "predict_paths"]


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs`` (:func:`reference.files.collect_images`; problems
    as :class:`~hidiff.data.DataError`)."""
    return files.collect_images(inputs, error=DataError)


def predict_paths(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    *,
    out: str | Path,
    steps: int | None = None,
    samples: int | None = None,
    estimate: str | None = None,
    seed: int = 0,
    refiner: str | None = "binary",
    uncertainty: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write ``out/<stem>.png`` masks for the images in ``inputs``; returns the written paths.

    ``refiner``: ``"binary"`` (HiDiff), ``"fp"`` (the full-precision twin, when the folder has
    one) or ``"none"``/``None`` (the segmentor alone). ``steps`` / ``samples`` / ``seed``:
    sampling steps and chains averaged (defaults: the model's) and the seed of the uniforms
    (each image is predicted on its own with this seed). ``estimate``: each chain's estimate,
    ``"last"`` or ``"trajectory"`` (``reference.ESTIMATES``; default: the model's).
    ``uncertainty``: also write ``out/<stem>_uncertainty.png``, the spread of y0_hat across the
    chains (:func:`reference.uncertainty_pixels`; all 0 for one chain or the segmentor alone).
    An input is never overwritten; an output file that already exists is refused unless
    ``overwrite``.
    """
    model, pipe = pipeline_from_model_dir(model_dir)
    pipe.refiner_module(refiner)  # reject an unknown / unavailable refiner before reading anything
    pipe.sampler(steps, samples, estimate=estimate)  # validate the sampling up front
    paths = collect_images(inputs)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output path exists and is not a folder")
    targets = [out_dir / f"{p.stem}.png" for p in paths]
    extra = [out_dir / f"{p.stem}_uncertainty.png" for p in paths] if uncertainty else []
    names = [t.name for t in targets + extra]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{out_dir / dup}: two outputs of this run would have this name; rename "
                         f"one of the inputs")
    clash = [str(p) for p in paths for t in targets + extra if t.resolve() == p.resolve()]
    if clash:
        raise ValueError(f"{clash[0]}: would be overwritten by its own mask; choose another "
                         f"output folder ({preview(clash)})")
    existing = [str(t) for t in targets + extra if t.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]}: already exists; pass --overwrite (overwrite=True) to "
                         f"replace the outputs of an earlier run ({preview(existing)})")
    channels = model.config.in_channels
    for path in paths:  # decode everything once before writing anything
        read_image(path, channels)

    created = files.make_folder(out_dir)
    written: list[Path] = []
    try:
        bar = tqdm(list(zip(paths, targets, strict=True)), desc="predict", unit="image",
                   disable=not progress, leave=False)
        for path, target in bar:
            image = read_image(path, channels)
            pred = pipe.predict_image(image, steps=steps, samples=samples, seed=seed,
                                      refiner=refiner, estimate=estimate)
            pixels = files.mask_pixels(pred.mask, model.config.num_classes)
            written.append(files.write_png(target, pixels))
            if uncertainty:
                spread_png = target.with_name(f"{path.stem}_uncertainty.png")
                written.append(files.write_png(spread_png,
                                               reference.uncertainty_pixels(pred.spread)))
    except BaseException:
        if not written:
            files.remove_made_folders(created)
        raise
    return written

