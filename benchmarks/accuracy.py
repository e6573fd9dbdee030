"""Accuracy benchmark: HiDiff vs its own segmentor vs the same segmentor trained alone.

    python benchmarks/accuracy.py --data ../shared/data                 # the full report
    python benchmarks/accuracy.py --quick --results /tmp/acc            # a smoke run (CI)
    python benchmarks/accuracy.py --refine-more 1800 --reuse   # + going on, segmentor frozen

Per dataset and seed, with the same wall-clock budget for both runs:

1. HiDiff: ``hidiff.training.train`` (segmentor alone for ``--pretrain-fraction`` of the budget,
   then alternating; binary refiner with the ``bayes`` offset and ``--self-align``; the
   full-precision twin on, for the binary-vs-fp column);
2. the segmentor trained alone for the whole budget (what a user gets without HiDiff).

With ``--refine-more N``, each finished HiDiff model is also copied and resumed for N
refiner-alone iterations, its segmentor frozen (``hidiff train --resume --refine-after-minutes
0``), and scored beside it: what a user with more time than the budget gets.

All are evaluated on the committed test split with ``hidiff.evaluation.evaluate`` at the
model's default sampling (steps x S): predictors *segmentor inside HiDiff*, *HiDiff binary*,
*HiDiff fp twin*, *segmentor trained alone*. The first seed of each dataset also gets a
steps x S table of HiDiff binary (Dice and seconds per case; one per chain estimate of
``--sweep-estimates``, default the model's). Results go to
``benchmarks/results/accuracy.md`` and ``accuracy.json`` (``--results`` changes the stem).
Settings are never chosen here: the defaults come from the val split (``benchmarks/ablation.py``);
this script touches the test split once per reported number. ``--reuse`` takes model folders
whose run already finished and the evaluations already written in them (``eval/test/summary.json``
at the same sampling and seed, ``sweep.json`` covering the sweep; evaluation is deterministic, so
a reused number is the number a re-evaluation gives); the report lists what was reused. The
steps x S sweep runs for ``--sweep-datasets`` only (default Kvasir-SEG: on CHASE_DB1's tiles it
costs about 30 min of CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accuracy_report import PREDICTORS, report  # benchmarks/ is sys.path[0]

import reference
from hidiff.data import get_reader, load_case
from hidiff.evaluation import evaluate, pipeline_from_model_dir
from hidiff.model_dir import read_config
from hidiff.model_files import ModelDirError
from hidiff.training import train
from hidiff.training.lr_schedule import SEGMENTOR_SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kvasir-seg": "Kvasir-SEG", "chase-db1": "CHASE_DB1"}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def _mean(summary: dict, predictor: str, metric: str = "dice") -> float | None:
    entry = summary["predictors"].get(predictor, {})
    if not entry.get("available", False):
        return None
    value = entry["metrics"][metric]["mean"]
    return None if isinstance(value, str) else float(value)


def _train(args, dataset: str, out: Path, seed: int, minutes: float, *, alone: bool) -> dict:
    done = out / "checkpoint.pt"
    if args.reuse and done.is_file():
        return json.loads((out / "run.json").read_text())
    kw = dict(dataset=dataset, data=Path(args.data) / FOLDERS[dataset], preset=args.preset,
              out=out, max_minutes=minutes, lr=args.lr, seed=seed, progress=not args.quiet,
              checkpoint_every=10_000, segmentor_schedule=args.segmentor_schedule)
    if args.quick:
        kw.update(max_steps=args.quick_steps, limit_cases=8, batch_size=2)
    if alone:  # the segmentor alone for the whole budget (its refiner is never trained)
        kw.update(pretrain_minutes=minutes, pretrain_steps=10**9, train_fp_twin=False)
    else:
        kw.update(pretrain_minutes=args.pretrain_fraction * minutes, train_fp_twin=True,
                  self_align=args.self_align, refiner_holdout=args.refiner_holdout,
                  lambda_y0=args.lambda_y0,
                  pretrain_steps=args.quick_steps // 2 if args.quick else 0)
        if args.refine_fraction:  # the last part of the budget: the refiner alone
            kw.update(refine_after_minutes=(1.0 - args.refine_fraction) * minutes)
            if args.quick:  # its few steps end long before any minute mark
                kw.update(refine_after_steps=args.quick_steps - 1)
    result = train(**kw)
    run = {"iterations": result.step, "minutes": round(result.elapsed_s / 60, 2)}
    (out / "run.json").write_text(json.dumps(run))
    return run


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refine_more(args, dataset: str, src: Path, out: Path, start: int) -> dict:
    """A copy of the finished HiDiff folder ``src`` (evaluations left out) resumed for
    ``--refine-more`` refiner-alone iterations, its segmentor frozen (``hidiff train --resume
    --refine-after-minutes 0``: what a user with more time does with a trained model).

    ``run.json`` records the end step and the SHA-256 of the checkpoint it went on from;
    ``--reuse`` takes a finished copy only when both match (not one left from another model)."""
    end = start + args.refine_more
    source = _sha256(src / "checkpoint.pt")
    run_file = out / "run.json"
    if args.reuse and (out / "checkpoint.pt").is_file() and run_file.is_file():
        run = json.loads(run_file.read_text())
        if run.get("iterations") == end and run.get("source_checkpoint_sha256") == source:
            return run
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("eval", "sweep.json", "run.json"))
    with warnings.catch_warnings():
        if args.quiet:  # resume's notes on the stored options the defaults passed here differ from
            warnings.simplefilter("ignore", UserWarning)
        result = train(dataset=dataset, data=Path(args.data) / FOLDERS[dataset],
                       preset=args.preset, out=out, resume=True, max_steps=end,
                       refine_after_minutes=0.0, progress=not args.quiet,
                       checkpoint_every=10_000)
    run = {"iterations": result.step, "refiner_alone": result.step - start,
           "minutes": round(result.elapsed_s / 60, 2), "source_checkpoint_sha256": source}
    run_file.write_text(json.dumps(run))
    return run


def _evaluate(args, model_dir: Path, reused: list, **kw) -> dict:
    """``hidiff.evaluation.evaluate`` on the test split, or (``--reuse``) its summary.json when
    it was written with the sampling asked for (steps, S, estimate: the model's unless given)
    and seed."""
    done = model_dir / "eval" / "test" / "summary.json"
    if args.reuse and done.is_file():
        summary = json.loads(done.read_text())
        wanted = set(kw.get("predictors") or summary["predictors"])
        d = read_config(model_dir).diffusion
        steps = kw.get("steps") or d.num_sampling_steps
        same_sampling = (summary["steps"] == steps
                         and summary.get("samples", 1) == d.sampling_samples
                         and (steps == 1 or summary.get("estimate", "last")
                              == d.sampling_estimate))
        if (summary.get("seed") == kw["seed"] and same_sampling
                and wanted <= set(summary["predictors"]) and kw.get("limit") is None):
            reused.append(str(done.relative_to(Path(args.out))))
            return summary
    return evaluate(model_dir, split="test", **kw)


def sweep(model_dir: Path, data: Path, dataset: str, combos, *, seed: int,
          limit: int | None, reuse: bool = False, reused: list | None = None,
          estimate: str | None = None) -> list[dict]:
    """Dice (mean over test cases, original resolution) and s/case of HiDiff binary per (steps,
    S) with each chain's ``estimate`` (default the model's); kept in ``model_dir / sweep.json``
    (taken from there with ``reuse``; rows written before the estimate was recorded are
    ``last``)."""
    if not combos:
        return []
    cache = model_dir / "sweep.json"
    estimate = estimate or read_config(model_dir).diffusion.sampling_estimate
    stored = json.loads(cache.read_text()) if cache.is_file() else []
    for r in stored:
        r.setdefault("estimate", "last")
    key = [{"steps": st, "samples": sa, "seed": seed, "limit": limit, "estimate": estimate}
           for st, sa in combos]
    found = [r for k in key for r in stored if {n: r.get(n) for n in k} == k]
    if reuse and len(found) == len(key):
        if reused is not None:
            reused.append(str(cache.name) + f" of {model_dir.parent.name}/{model_dir.name}"
                          + (f" ({estimate})" if estimate != "last" else ""))
        return found
    model, pipe = pipeline_from_model_dir(model_dir)
    cases = model.split.select(get_reader(dataset).list_cases(data), "test")[:limit]
    loaded = [load_case(c, model.dataset_info) for c in cases]
    rows = []
    for steps, samples in combos:
        scores, start = [], time.perf_counter()
        for image, gt in loaded:
            pred = pipe.predict_image(image, steps=steps, samples=samples, seed=seed,
                                      estimate=estimate)
            scores.append(reference.metrics.dice(pred.mask.astype(bool), gt.astype(bool)))
        rows.append({"steps": steps, "samples": samples, "dice": float(np.nanmean(scores)),
                     "s_per_case": (time.perf_counter() - start) / len(loaded), "seed": seed,
                     "limit": limit, "estimate": estimate})
    # rows of other combos, seeds or estimates stay in the cache
    keep = [r for r in stored if {n: r.get(n) for n in key[0]} not in key]
    cache.write_text(json.dumps(keep + rows, indent=1) + "\n")
    return rows


def run_dataset(args, dataset: str, minutes: float, seeds: list[int]) -> dict:
    data = Path(args.data) / FOLDERS[dataset]
    limit = (4 if dataset == "kvasir-seg" else 1) if args.quick else None
    steps = 2 if args.quick else None  # quick: fewer steps than the model's default
    runs, reused = [], []
    for i, seed in enumerate(seeds):
        base = Path(args.out) / dataset / f"seed{seed}"
        hid = _train(args, dataset, base / "hidiff", seed, minutes, alone=False)
        alone = _train(args, dataset, base / "segmentor_alone", seed, minutes, alone=True)
        s_h = _evaluate(args, base / "hidiff", reused, data=data, steps=steps, seed=seed,
                        limit=limit, overlays=2, progress=not args.quiet)
        s_a = _evaluate(args, base / "segmentor_alone", reused, data=data, seed=seed,
                        limit=limit, overlays=0, predictors=("segmentor",),
                        progress=not args.quiet)
        dice = {k: _mean(s_h, k) for k, _ in PREDICTORS[:3]} | {"alone": _mean(s_a, "segmentor")}
        more = None
        if args.refine_more:
            more = _refine_more(args, dataset, base / "hidiff", base / "hidiff_refined",
                                hid["iterations"])
            s_r = _evaluate(args, base / "hidiff_refined", reused, data=data, steps=steps,
                            seed=seed, limit=limit, overlays=0, progress=not args.quiet)
            # its segmentor is the frozen one: the same Dice, kept as a check
            dice |= {f"refined_{k}": _mean(s_r, k) for k, _ in PREDICTORS[:3]}
        sec = {k: s_h["predictors"][k].get("seconds_per_case") for k, _ in PREDICTORS[:3]}
        run = {"seed": seed, "hidiff_run": hid, "alone_run": alone, "refined_run": more,
               "dice": dice,
               "seconds_per_case": sec | {"alone": s_a["predictors"]["segmentor"][
                   "seconds_per_case"]},
               "steps": s_h["steps"], "samples": s_h.get("samples", 1),
               "estimate": s_h.get("estimate", "last"),
               "n_cases": s_h["n_cases"]}
        if i == 0 and args.sweep and dataset in args.sweep_datasets.split(","):
            run["sweep"] = [row for est in args.sweep_estimates
                            for row in sweep(base / "hidiff", data, dataset, args.sweep,
                                             seed=seed, limit=limit, reuse=args.reuse,
                                             reused=reused, estimate=est)]
        runs.append(run)
        print(json.dumps({dataset: run}), flush=True)
    return {"dataset": dataset, "minutes": minutes, "runs": runs, "reused": reused}


def _estimates(text: str) -> list[str]:
    items = [e for e in text.split(",") if e]
    bad = [e for e in items if e not in reference.ESTIMATES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown estimate(s) {', '.join(bad) or text!r}; "
                                          f"allowed: {', '.join(reference.ESTIMATES)}")
    return items


def _combos(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        steps, _, samples = item.partition("x")
        out.append((int(steps), int(samples or 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--out", default=str(ROOT / "runs" / "accuracy"))
    p.add_argument("--kvasir-minutes", type=float, default=20.0)
    p.add_argument("--kvasir-seeds", default="0,1")
    p.add_argument("--chase-minutes", type=float, default=15.0)
    p.add_argument("--chase-seeds", default="0")
    p.add_argument("--datasets", default="kvasir-seg,chase-db1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--segmentor-schedule", choices=SEGMENTOR_SCHEDULES, default="cosine",
                   help="the segmentor's learning rate in both runs, HiDiff's and the segmentor "
                        "alone's (hidiff train --segmentor-schedule); default cosine")
    p.add_argument("--pretrain-fraction", type=float, default=0.6)
    p.add_argument("--refine-fraction", type=float, default=0.0,
                   help="last fraction of HiDiff's budget that trains the refiner alone, the "
                        "segmentor frozen (hidiff train --refine-after-minutes); default 0")
    p.add_argument("--refine-more", type=int, default=0, metavar="N",
                   help="also go on from each finished HiDiff model for N refiner-alone "
                        "iterations, segmentor frozen (hidiff train --resume "
                        "--refine-after-minutes 0), and report its Dice; default 0: not run")
    p.add_argument("--self-align", type=float, default=0.5)
    p.add_argument("--refiner-holdout", type=float, default=0.0,
                   help="fraction of the train cases kept from HiDiff's segmentor for its "
                        "refiner (hidiff train --refiner-holdout)")
    p.add_argument("--lambda-y0", type=float, default=1.0,
                   help="weight of the y0 cross-entropy in the refiner loss (hidiff train "
                        "--lambda-y0)")
    p.add_argument("--sweep", type=_combos, default=_combos("1x1,3x1,10x1,1x4,3x4,10x4,1x8,10x8"),
                   help="STEPSxS,... for the first seed (empty: none)")
    p.add_argument("--sweep-estimates", type=_estimates, default=[None],
                   help="chain estimates of the sweep, comma-separated among "
                        f"{', '.join(reference.ESTIMATES)} (default: the model's)")
    p.add_argument("--sweep-datasets", default="kvasir-seg",
                   help="datasets that get the sweep (default kvasir-seg)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished model folders and the evaluations written in them")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "accuracy"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny preset, 8 cases, a few iterations, 4 test cases")
    p.add_argument("--quick-steps", type=int, default=6)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not 0.0 <= args.refine_fraction <= 1.0 - args.pretrain_fraction + 1e-9:  # 1 - 0.9 < 0.1
        p.error(f"--refine-fraction must be in [0, 1 - --pretrain-fraction = "
                f"{1.0 - args.pretrain_fraction:g}]; got {args.refine_fraction}")
    if args.refine_more < 0:
        p.error(f"--refine-more must be an integer >= 0; got {args.refine_more}")
    if args.quick:
        args.preset = "tiny"
        args.sweep = [(1, 1), (2, 2)]
        args.sweep_estimates = list(reference.ESTIMATES)
        args.sweep_datasets = "kvasir-seg,chase-db1"
        args.out = str(Path(args.results).parent / "accuracy-quick-runs")
    start = time.time()
    results = []
    try:
        for dataset in args.datasets.split(","):
            kvasir = dataset == "kvasir-seg"
            minutes = args.kvasir_minutes if kvasir else args.chase_minutes
            seeds = [int(s) for s in (args.kvasir_seeds if kvasir else args.chase_seeds)
                     .split(",")]
            if args.quick:
                minutes, seeds = 5.0, seeds[:1]
            results.append(run_dataset(args, dataset, minutes, seeds))
    except ModelDirError as err:  # e.g. a model folder left by an earlier run, without --reuse
        print(f"accuracy.py: a model folder is in the way: {err}\n  for this script: --reuse "
              "takes the finished folders of an earlier run, or give another --out",
              file=sys.stderr)
        return 2
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".json").write_text(json.dumps(
        {"machine": machine(), "argv": sys.argv[1:], "results": results}, indent=1))
    Path(args.results + ".md").write_text(
        report(results, args, time.time() - start, machine=machine()))
    print(f"wrote {args.results}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
