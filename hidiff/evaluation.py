"""Evaluate a model folder: segmentor alone vs HiDiff (binary refiner) vs HiDiff (full precision).

:func:`evaluate` runs three predictors on the same cases with the same sampling steps and seed:

- ``segmentor``      the segmentor alone (mask = prior > 0.5, or argmax for K > 1);
- ``hidiff_binary``  segmentor + the binarized refiner (the HiDiff model);
- ``hidiff_fp``      segmentor + the full-precision twin refiner, when the folder has one
  (trained without ``--no-fp-twin``); otherwise reported as unavailable with the reason.

Each predictor runs its whole pipeline per image (:meth:`HiDiffPipeline.predict_image`, one image
per call, uniforms from ``reference.draw_uniforms(seed, ...)``), so its wall time is that of the
full inference; data loading and metrics are not timed. Metrics (:mod:`reference.metrics`: Dice,
IoU, HD95 in pixels, recall, accuracy) are computed per case at the ORIGINAL mask resolution
(predicted masks are brought back to it: nearest resize for the ``resize`` policy, stitched tiles
for ``tile``). For K > 1 each case's value is the mean over the foreground classes present in
prediction or ground truth (finite values only); the per-class values are kept too.

Written to ``out`` (default ``MODEL_DIR/eval/<split>/``):

``per_case.json``  ``{"split", "steps", "samples", "estimate", "seed", "predictors": [...],
                   "cases": [{"case_id",
                   "image", "mask", "size": [H, W], "metrics": {predictor: {metric: value}},
                   ("classes": {predictor: {label: {metric: value}}} for K > 1)}]}``
``summary.json``   ``{"model_dir", "dataset", "data", "split", "n_cases", "steps", "samples",
                   "estimate", "seed",
                   "checkpoint_step", "predictors": {name: {"available", "label",
                   "wall_time_s", "seconds_per_case", "metrics": reference.metrics.summarize(...)}
                   or {"available": false, "label", "reason"}}, "overlays": [...]}``
``overlays/<case_id>.png``  image + ground-truth contour, then one panel per predictor.

Non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON).
HD95 is +inf when exactly one of prediction and ground truth is empty; such cases are excluded
from the HD95 mean and counted in ``n_inf`` (see ``reference.metrics``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hidiff.data.io import load_case
from hidiff.data.readers import get_reader
from hidiff.model_dir import load_model_dir
from hidiff.model_files import atomic_write_text
from hidiff.overlay import save_overlay
from hidiff.pipeline import HiDiffPipeline
from reference import files
from reference import metrics as rm

__all__ = ["PREDICTORS", "evaluate", "format_table", "pipeline_from_model_dir"]

#: predictor key -> (refiner argument of the pipeline, label in tables and overlays)
PREDICTORS: dict[str, tuple[str | None, str]] = {
    "segmentor": (None, "segmentor alone"),
    "hidiff_binary": ("binary", "HiDiff binary refiner"),
    "hidiff_fp": ("fp", "HiDiff full-precision refiner"),
}
_SHORT = {"segmentor": "segmentor", "hidiff_binary": "HiDiff binary", "hidiff_fp": "HiDiff FP"}
_TABLE_METRICS = (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95"), ("recall", "recall"),
                  ("accuracy", "accuracy"))
_DATA_KEYS = ("data", "data_root", "root")
_DATASET_KEYS = ("dataset", "dataset_name")


def pipeline_from_model_dir(model_dir: str | Path):
    """``(LoadedModel, HiDiffPipeline)`` of a trained model folder."""
    model = load_model_dir(model_dir)
    pipe = HiDiffPipeline(model.segmentor, model.refiner, config=model.config,
                          dataset_info=model.dataset_info, refiner_fp=model.refiner_fp)
    return model, pipe


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int):
    """(metrics, per-class metrics or None) of one case."""
    if num_classes == 1:
        return rm.case_metrics(pred, gt), None
    per_class = rm.multiclass(pred, gt, classes=range(1, num_classes))
    present = [m for c, m in per_class.items() if np.any(pred == c) or np.any(gt == c)]
    if not present:  # background only, in both
        return rm.case_metrics(pred != 0, gt != 0), per_class
    macro = {}
    for name in rm.METRICS:
        values = np.array([m[name] for m in present], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            macro[name] = float(finite.mean())
        else:
            macro[name] = math.inf if np.isinf(values).any() else math.nan
    return macro, per_class


def _warm_up(pipe: HiDiffPipeline, refiners: list[str | None]) -> None:
    """One untimed one-step run per predictor, so first-call overheads stay out of the timings."""
    size = pipe.config.image_size
    x = torch.zeros(1, pipe.config.in_channels, size, size)
    for refiner in refiners:
        pipe.predict(x, steps=1, refiner=refiner)


def _first(mapping: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k)), None)


def _resolve_data(model, data: str | Path | None) -> tuple[str, Path]:
    dataset = _first(model.train_args, _DATASET_KEYS) or model.dataset_info.name
    if data is None:
        data = _first(model.train_args, _DATA_KEYS)
        if data is None:
            raise ValueError(f"{model.path}: the model folder does not record where its data is; "
                             "pass the dataset folder (--data PATH)")
        if not Path(data).is_dir():
            raise ValueError(f"{data}: the dataset folder recorded at training is not there "
                             "(relative paths are taken from the current folder); pass --data PATH")
    return str(dataset), Path(data)


def evaluate(
    model_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    steps: int | None = None,
    samples: int | None = None,
    estimate: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    overlays: int = 4,
    limit: int | None = None,
    predictors: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the three predictors of ``model_dir`` on subset ``split`` of its split.

    ``data``: the dataset folder (default: the one recorded at training). ``steps`` /
    ``samples`` / ``seed``: sampling steps and chains averaged per image (defaults: the
    config's) and the uniforms' seed; ``estimate``: each chain's estimate, ``last`` or
    ``trajectory`` (default: the config's ``sampling_estimate``). ``limit``: only the first
    ``limit`` cases of the subset. ``overlays``: how many cases (the first ones) get an overlay
    PNG. ``predictors``: a subset of ``PREDICTORS`` to run (default: every one the folder has).
    Returns the summary dict (also written to ``summary.json``; see the module docstring).
    """
    model, pipe = pipeline_from_model_dir(model_dir)
    dataset, root = _resolve_data(model, data)
    if split not in model.split.names:
        raise ValueError(f"the model's split has no subset {split!r}; it has "
                         f"{', '.join(model.split.names)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1; got {limit}")
    info = model.dataset_info
    cases = model.split.select(get_reader(dataset).list_cases(root), split)[:limit]
    if not cases:
        raise ValueError(f"subset {split!r} of the model's split is empty")
    sampler = pipe.sampler(steps, samples, estimate=estimate)  # validates all three
    steps_used, samples_used = sampler.schedule.num_steps, sampler.samples
    if predictors is not None:
        unknown = [k for k in predictors if k not in PREDICTORS]
        if unknown or not predictors:
            raise ValueError(f"predictors must be a non-empty subset of {', '.join(PREDICTORS)}; "
                             f"got {predictors!r}")
    available = {k: (k != "hidiff_fp" or pipe.has_fp)
                 and (predictors is None or k in predictors) for k in PREDICTORS}
    active = [k for k in PREDICTORS if available[k]]
    out_dir = Path(out) if out is not None else Path(model_dir) / "eval" / split
    made = files.make_folder(out_dir / "overlays" if overlays > 0 else out_dir)
    overlay_files: list[str] = []
    try:
        per_case, timings = _run_cases(pipe, cases, info, active, out_dir, overlays,
                                       overlay_files, split=split, steps=steps_used,
                                       samples=samples_used, estimate=sampler.estimate,
                                       seed=seed, progress=progress)
    except BaseException:  # nothing half-written: this call's overlays and folders go
        for name in overlay_files:
            Path(name).unlink(missing_ok=True)
        files.remove_made_folders(made)
        raise

    settings = {"split": split, "steps": steps_used, "samples": samples_used,
                "estimate": sampler.estimate, "seed": seed}
    _write_json(out_dir / "per_case.json",
                {**settings, "predictors": active, "cases": per_case})
    n = len(cases)
    entries: dict[str, Any] = {}
    for key, (_, label) in PREDICTORS.items():
        if not available[key]:
            reason = ("not asked for" if predictors is not None and key not in predictors else
                      "the model folder has no full-precision twin refiner (train with --fp-twin "
                      "for it)")
            entries[key] = {"available": False, "label": label, "reason": reason}
            continue
        entries[key] = {
            "available": True, "label": label, "wall_time_s": timings[key],
            "seconds_per_case": timings[key] / n,
            "metrics": rm.summarize([c["metrics"][key] for c in per_case]),
        }
    summary = {"model_dir": str(model_dir), "dataset": dataset, "data": str(root), **settings,
               "n_cases": n, "checkpoint_step": model.step, "predictors": entries,
               "overlays": overlay_files, "out_dir": str(out_dir)}
    _write_json(out_dir / "summary.json", summary)
    return summary


def _run_cases(pipe: HiDiffPipeline, cases: list, info, active: list[str], out_dir: Path,
               overlays: int, overlay_files: list[str], *, split: str, steps: int, samples: int,
               estimate: str, seed: int, progress: bool
               ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Predict and score every case with every active predictor; the first ``overlays`` cases
    get an overlay PNG (its path appended to ``overlay_files`` as soon as it is written)."""
    _warm_up(pipe, [PREDICTORS[k][0] for k in active])
    timings = dict.fromkeys(active, 0.0)
    per_case: list[dict[str, Any]] = []
    bar = tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not progress, leave=False)
    for index, case in enumerate(bar):
        image, gt = load_case(case, info)
        record: dict[str, Any] = {"case_id": case.case_id, "image": str(case.image),
                                  "mask": str(case.mask), "size": list(gt.shape),
                                  "metrics": {}}
        masks = {}
        for key in active:
            start = time.perf_counter()
            pred = pipe.predict_image(image, steps=steps, samples=samples, seed=seed,
                                      refiner=PREDICTORS[key][0], estimate=estimate)
            timings[key] += time.perf_counter() - start
            masks[key] = pred.mask
            values, per_class = _case_metrics(pred.mask, gt, info.num_classes)
            record["metrics"][key] = values
            if per_class is not None:
                record.setdefault("classes", {})[key] = per_class
        per_case.append(record)
        if index < overlays:
            panels = [(f"{_SHORT[k]}  Dice {record['metrics'][k]['dice']:.3f}", masks[k])
                      for k in active]
            path = save_overlay(out_dir / "overlays" / f"{case.case_id}.png", image, gt, panels,
                                title=f"{case.case_id} (ground truth)",
                                height=512 if info.policy == "tile" else 256)
            overlay_files.append(str(path))

    return per_case, timings


def _num(value: Any) -> float:
    if isinstance(value, str):
        return float(value)  # "nan" / "inf" as written to JSON
    return float(value)


def format_table(summary: dict[str, Any]) -> str:
    """The three-predictor table (means over the cases; HD95 over the finite cases)."""
    lines = [
        f"{summary.get('dataset', '?')} {summary['split']}: {summary['n_cases']} case(s), "
        f"{summary['steps']} sampling step(s) x {summary.get('samples', 1)} chain(s), "
        # one step: both estimates are that step's y0_hat
        + (f"{summary.get('estimate', 'last')} estimate, " if summary["steps"] > 1 else "")
        + f"seed {summary['seed']}, "
        f"checkpoint step {summary.get('checkpoint_step', '?')}",
        f"{'predictor':<31}" + "".join(f"{h:>10}" for _, h in _TABLE_METRICS) + f"{'s/case':>10}",
    ]
    notes = []
    for key, entry in summary["predictors"].items():
        label = entry.get("label", key)
        if not entry.get("available"):
            lines.append(f"{label:<31}  not available: {entry.get('reason', '')}")
            continue
        m = entry["metrics"]
        cells = "".join(f"{_num(m[name]['mean']):>10.4f}" if name != "hd95"
                        else f"{_num(m[name]['mean']):>10.2f}" for name, _ in _TABLE_METRICS)
        lines.append(f"{label:<31}{cells}{_num(entry['seconds_per_case']):>10.3f}")
        hd = m["hd95"]
        if hd["n_inf"] or hd["n_nan"]:
            notes.append(f"{label}: HD95 mean over {hd['n_finite']} of {hd['n']} cases "
                         f"({hd['n_inf']} with exactly one empty mask, {hd['n_nan']} both empty)")
    return "\n".join(lines + notes)
