"""Accuracy benchmark: train HiDiff on Kvasir-SEG and CHASE_DB1 under a time budget, evaluate the
segmentor alone, HiDiff with the binary refiner and HiDiff with the full-precision twin on the
committed test splits, and write ``benchmarks/results/accuracy.md`` (+ ``accuracy.json``).

    python benchmarks/accuracy.py --data ../shared/data --preset cpu-small \\
        --kvasir-minutes 25 --chase-minutes 12 --steps-sweep 1,2,5,10

Every number in the report is measured by this script in the run that wrote it. ``--reuse`` skips
training when the model folder already holds a finished run (to re-evaluate only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hidiff.evaluation import evaluate
from hidiff.training import train

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"kvasir-seg": "Kvasir-SEG", "chase-db1": "CHASE_DB1"}
PREDICTORS = ("segmentor", "hidiff_binary", "hidiff_fp")
METRICS = ("dice", "iou", "hd95", "recall", "accuracy")


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


def mean(summary: dict, predictor: str, metric: str) -> float | None:
    entry = summary["predictors"].get(predictor, {})
    if not entry.get("available", False):
        return None
    value = entry["metrics"][metric]["mean"]
    return None if isinstance(value, str) else float(value)


def row(name: str, summary: dict, predictor: str) -> str:
    cells = []
    for metric in METRICS:
        v = mean(summary, predictor, metric)
        cells.append("n/a" if v is None else f"{v:.2f}" if metric == "hd95" else f"{v:.4f}")
    sec = summary["predictors"].get(predictor, {}).get("seconds_per_case")
    return f"| {name} | {predictor} | " + " | ".join(cells) + f" | {sec:.2f} |" if sec else (
        f"| {name} | {predictor} | " + " | ".join(cells) + " | n/a |")


def run_dataset(args: argparse.Namespace, dataset: str, minutes: float) -> dict:
    data = Path(args.data) / DATASETS[dataset]
    out = Path(args.out) / dataset
    t0 = time.time()
    if not (args.reuse and (out / "checkpoint.pt").exists()):
        result = train(dataset=dataset, data=data, preset=args.preset, out=out,
                       max_minutes=minutes, lr=args.lr, seed=args.seed,
                       pretrain_steps=args.pretrain_steps, batch_size=args.batch_size,
                       resume=args.reuse and (out / "checkpoint.pt").exists(),
                       progress=not args.quiet, log_every=25, checkpoint_every=200)
        train_steps, train_s = result.step, result.elapsed_s
    else:
        ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        train_steps, train_s = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
    evals = {}
    sweep = args.steps_sweep if dataset == "kvasir-seg" else args.chase_steps_sweep
    for steps in sweep:
        evals[steps] = evaluate(out, data=data, split="test", steps=steps, seed=args.seed,
                                out=out / "eval" / f"test_steps{steps}", overlays=4,
                                progress=not args.quiet)
    return {"dataset": dataset, "model_dir": str(out), "train_steps": train_steps,
            "train_seconds": train_s, "wall_seconds": time.time() - t0,
            "evaluations": {str(k): v for k, v in evals.items()}}


def report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "# Accuracy: segmentor alone vs HiDiff (binary refiner) vs HiDiff (full-precision twin)",
        "",
        f"Written by `benchmarks/accuracy.py` on {time.strftime('%Y-%m-%d')}; machine: "
        f"{machine()}; no GPU. Total wall time {wall / 60:.1f} min.",
        "",
        "Command:",
        "",
        "```",
        "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "```",
        "",
        f"Preset `{args.preset}`, AdamW lr {args.lr}, {args.pretrain_steps} segmentor-only "
        "warm-up iterations, then alternating training (method §6); the full-precision twin is "
        "trained on the same frozen segmentor outputs. Test splits are the committed ones "
        "(`hidiff/splits/`). Metrics at the original mask resolution; means over test cases "
        "(HD95 in pixels, over cases where both masks are non-empty).",
        "",
    ]
    for res in results:
        lines += [f"## {res['dataset']}", "",
                  f"Trained {res['train_steps']} iterations in {res['train_seconds'] / 60:.1f} "
                  f"min; model folder `{res['model_dir']}`.", "",
                  "| sampling steps | predictor | Dice | IoU | HD95 | recall | accuracy "
                  "| s/case |", "|---|---|---|---|---|---|---|---|"]
        for steps, summary in res["evaluations"].items():
            n = summary["n_cases"]
            for predictor in PREDICTORS:
                lines.append(row(f"{steps} ({n} cases)", summary, predictor))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--out", default=str(ROOT / "runs" / "accuracy"))
    p.add_argument("--kvasir-minutes", type=float, default=25.0)
    p.add_argument("--chase-minutes", type=float, default=12.0)
    p.add_argument("--datasets", default="kvasir-seg,chase-db1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-sweep", default="10",
                   help="comma-separated sampling-step counts to evaluate (default 10)")
    p.add_argument("--chase-steps-sweep", default="10",
                   help="the same for CHASE_DB1 (whole tiled images: slower to evaluate)")
    p.add_argument("--reuse", action="store_true", help="re-evaluate existing model folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "accuracy"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.steps_sweep = [int(s) for s in args.steps_sweep.split(",")]
    args.chase_steps_sweep = [int(s) for s in args.chase_steps_sweep.split(",")]
    minutes = {"kvasir-seg": args.kvasir_minutes, "chase-db1": args.chase_minutes}
    t0 = time.time()
    results = [run_dataset(args, d, minutes[d]) for d in args.datasets.split(",")]
    wall = time.time() - t0
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(report(results, args, wall) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
