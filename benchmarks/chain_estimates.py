"""Where along the reverse chain the Dice is: val Dice of every step's y0 estimate, of each
chain's last estimate and of its trajectory mean, for trained HiDiff model folders.

    python benchmarks/chain_estimates.py runs/acc_y0/kvasir-seg/seed0/hidiff \\
        runs/acc_y0/kvasir-seg/seed1/hidiff --grid 10x1,3x4,10x4
    python benchmarks/chain_estimates.py --quick --results /tmp/chain_estimates   # smoke run (CI)

For each model and each (steps, S) of ``--grid`` the val split is predicted once at the model
resolution (sampling seed 0, the torch pipeline's networks through
:func:`reference.predict_batch` with a trace). From that one run it scores, against the resized
ground truth: step k's y0_hat averaged over the S chains (``steps[k]``), the ``last`` estimate
(the final step's, what models written before 2026-12-04 sample with) and the ``trajectory``
estimate (every step's y0_hat averaged; :func:`reference.reverse_process`), next to the
segmentor alone. Both estimates come from the same chains, so their difference is the estimate
alone. What the refiner changes: the fraction of pixels where the ``trajectory`` mask differs from
the segmentor's mask, and the fraction of those that are right (above 0.5, refinement fixes more
than it breaks). Results: ``<results>.md`` / ``.json``. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ablation import parse_grid, write_results

import reference
from hidiff.data import get_reader
from hidiff.data.torch_dataset import SegmentationDataset
from hidiff.model_dir import load_model_dir
from hidiff.pipeline import HiDiffPipeline
from reference.metrics import dice

ROOT = Path(__file__).resolve().parents[1]


def step_estimates(pipe: HiDiffPipeline, x: np.ndarray, steps: int, samples: int,
                   chunk: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``(per-step y0_hat (S, N, K, H, W) each, last mean, trajectory mean)`` of one run: the
    product's ``trajectory`` sampling, its trace giving every step's estimate."""
    module = pipe.refiner_module("binary")
    sampler = pipe.sampler(steps, samples, estimate="trajectory")
    per_step, traj = [], []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            trace: list = []
            out = reference.predict_batch(
                x[start:start + chunk], segment=lambda a: pipe._segment(a, module, samples),
                denoise=pipe._denoise, sampler=sampler, seed=0, trace=trace)
            prior = np.broadcast_to(out.prior.astype(np.float64), (samples, *out.prior.shape))
            per_step.append([reference.y0_from_output(
                y, reference.refiner_output(net, y, prior, t, sampler.schedule,
                                            parameterization=sampler.parameterization,
                                            offset=sampler.offset), sampler.parameterization)
                for t, y, net, _ in trace])
            traj.append(out.prob)
    every = [np.concatenate([c[k] for c in per_step], axis=1) for k in range(steps)]
    traj_mean = np.concatenate(traj)
    # the trace reproduces what the loop returned (tests/reference/test_estimate.py)
    assert np.allclose((sum(every) / steps).mean(axis=0), traj_mean, rtol=0, atol=1e-12)
    return every, every[-1].mean(axis=0), traj_mean


def evaluate_model(folder: str, data: str, grid, *, limit: int | None) -> dict:
    model = load_model_dir(folder)
    if model.config.num_classes != 1:
        raise SystemExit(f"{folder}: chain_estimates scores binary (K = 1) models only")
    _, cases = get_reader(model.dataset_info.name).open(data)
    size = model.config.image_size
    val = SegmentationDataset(model.split.select(cases, "val")[:limit], model.dataset_info,
                              train=False, size=size, crop=size, cache=True)
    x = np.stack([val[i]["image"].numpy() for i in range(len(val))])
    gt = np.stack([val[i]["mask"].numpy()[0] > 0.5 for i in range(len(val))])
    pipe = HiDiffPipeline(model.segmentor, model.refiner, config=model.config,
                          dataset_info=model.dataset_info)

    def score(prob: np.ndarray) -> float:
        mask = reference.final_labels(prob)
        return float(np.nanmean([dice(mask[i].astype(bool), gt[i]) for i in range(len(gt))]))

    def changes(prob: np.ndarray, prior: np.ndarray) -> dict:
        mask, before = reference.final_labels(prob) == 1, reference.final_labels(prior) == 1
        changed = mask != before
        right = float((mask[changed] == gt[changed]).mean()) if changed.any() else float("nan")
        return {"changed": float(changed.mean()), "changed_right": right}

    with torch.no_grad():
        prior = pipe.predict(torch.from_numpy(x), refiner=None, batch_size=25).prob.numpy()
    res = {"model": folder, "checkpoint_step": model.step, "cases": len(gt),
           "segmentor": score(prior), "grid": {}}
    for steps, samples in grid:
        start = time.time()
        per_step, last, traj = step_estimates(pipe, x, steps, samples, chunk=25)
        res["grid"][f"{steps}x{samples}"] = {
            "last": score(last), "trajectory": score(traj), **changes(traj, prior),
            "steps": [score(e.mean(axis=0)) for e in per_step],
            "seconds": round(time.time() - start, 1)}
        print(json.dumps({"model": folder, "cell": f"{steps}x{samples}",
                          **res["grid"][f"{steps}x{samples}"]}), flush=True)
    return res


def report(rows: list[dict], grid: list[str]) -> str:
    lines = ["# Chain estimates on the val split", "",
             f"Written by `benchmarks/chain_estimates.py` on {time.strftime('%Y-%m-%d')}. Command:",
             "", "```", "python benchmarks/chain_estimates.py " + " ".join(sys.argv[1:]), "```",
             "", "Val Dice at the model resolution, sampling seed 0. `last`: each chain's final "
             "y0_hat; `trajectory`: the mean of its steps' y0_hat (same chains). Steps: the "
             "Dice of step k's y0_hat (averaged over the S chains), first step first. Changed: "
             "the fraction of pixels where the trajectory mask differs from the segmentor's; "
             "right: the fraction of those that the ground truth agrees with.", "",
             "| model | segmentor | steps x S | last | trajectory | changed | right | per step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for g in grid:
            c = r["grid"][g]
            per = " ".join(f"{v:.3f}" for v in c["steps"])
            lines.append(f"| `{r['model']}` | {r['segmentor']:.4f} | {g} | {c['last']:.4f} | "
                         f"{c['trajectory']:.4f} | {c['changed']:.4f} | "
                         f"{c['changed_right']:.3f} | {per} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="HiDiff model folders")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Kvasir-SEG"))
    p.add_argument("--grid", type=parse_grid, default=parse_grid("10x1,3x4,10x4"))
    p.add_argument("--limit", type=int, help="only the first N val cases")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "chain_estimates"))
    p.add_argument("--quick", action="store_true", help="smoke run: a 4-step tiny model, 4 cases")
    args = p.parse_args(argv)
    if args.quick:
        from hidiff.training import train

        folder = Path(args.results).parent / "chain-estimates-quick" / "tiny"
        if not (folder / "checkpoint.pt").is_file():
            train(dataset="kvasir-seg", data=args.data, preset="tiny", out=str(folder),
                  max_steps=4, batch_size=2, limit_cases=8, lr=1e-2, progress=False)
        args.models, args.grid, args.limit = [str(folder)], [(2, 1), (2, 2)], 4
    if not args.models:
        p.error("give at least one model folder (or --quick)")
    rows = [evaluate_model(m, args.data, args.grid, limit=args.limit) for m in args.models]
    write_results(args.results, rows, report(rows, [f"{s}x{k}" for s, k in args.grid]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
