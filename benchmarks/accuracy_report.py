"""Markdown report of ``benchmarks/accuracy.py``: the predictors per dataset and seed, the
``--refine-more`` rows and the steps x S sweeps (``benchmarks/results/accuracy.md``)."""

from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["PREDICTORS", "report"]

PREDICTORS = (("segmentor", "segmentor inside HiDiff"), ("hidiff_binary", "HiDiff binary"),
              ("hidiff_fp", "HiDiff fp twin"), ("alone", "segmentor trained alone"))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _refined_table(runs: list[dict]) -> list[str]:
    """The ``--refine-more`` rows: each HiDiff model before and after going on with its
    segmentor frozen (empty when it did not run)."""
    done = [r for r in runs if r.get("refined_run")]
    if not done:
        return []
    keys = ("segmentor", "hidiff_binary", "refined_segmentor", "refined_hidiff_binary",
            "refined_hidiff_fp")
    first = done[0]
    more = first["refined_run"]["iterations"] - first["hidiff_run"]["iterations"]
    lines = [f"Going on from each HiDiff model above for {more} "
             "refiner-alone iterations, its segmentor frozen (`--refine-more`, i.e. `hidiff "
             "train ... --resume --refine-after-minutes 0`); same test cases and sampling. The "
             "minutes are the refiner-alone part's, on top of the budget above.", "",
             "| seed | iterations in all (minutes more) | segmentor before | HiDiff binary "
             "before | segmentor after (frozen) | HiDiff binary after | HiDiff fp twin after |",
             "|---|---|---|---|---|---|---|"]
    for r in done:
        lines.append(f"| {r['seed']} | {r['refined_run']['iterations']} "
                     f"({r['refined_run']['minutes']:g}) | "
                     + " | ".join(_fmt(r["dice"][k]) for k in keys) + " |")
    if len(done) > 1:
        means = [_fmt(float(np.mean([r["dice"][k] for r in done]))
                      if all(r["dice"][k] is not None for r in done) else None) for k in keys]
        lines.append(f"| mean of {len(done)} | | " + " | ".join(means) + " |")
    return lines + [""]


def report(results: list[dict], args, wall: float, *, machine: str) -> str:
    """The markdown of one benchmark run: settings, the predictors per seed, the
    ``--refine-more`` rows, the steps x S sweeps and what was reused."""
    lines = ["# Accuracy: HiDiff vs its own segmentor vs the segmentor trained alone", "",
             f"Written by `benchmarks/accuracy.py` on {time.strftime('%Y-%m-%d')}; machine: "
             f"{machine}; no GPU. Total wall time {wall / 60:.1f} min.", "", "Command:", "",
             "```", "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]), "```", "",
             f"Preset `{args.preset}`, AdamW lr {args.lr}"
             + f" (the segmentor's learning rate on the `{args.segmentor_schedule}` schedule in "
               "both runs)"
             + "; HiDiff: segmentor alone for "
             f"{args.pretrain_fraction:.0%} of the budget, then alternating training"
             + (f" (the last {args.refine_fraction:.0%}: the refiner alone, segmentor frozen)"
                if args.refine_fraction else "") + ", binary "
             f"refiner with the `bayes` offset, self-align {args.self_align}, refiner holdout "
             f"{args.refiner_holdout:g}, y0 cross-entropy weight {args.lambda_y0:g}, "
             "full-precision twin trained beside it for its column. "
             "*Segmentor trained alone*: the same segmentor "
             "trained on L_seg only for the same wall clock. Test splits are the committed "
             "ones; Dice means over the test cases at the original mask resolution.", ""]
    for res in results:
        runs = res["runs"]
        lines += [f"## {res['dataset']} ({res['minutes']:g} min of training per run)", "",
                  "| seed | iterations (HiDiff / alone) | sampling | "
                  + " | ".join(label for _, label in PREDICTORS) + " |",
                  "|---|---|---|" + "---|" * len(PREDICTORS)]
        for r in runs:
            lines.append(f"| {r['seed']} | {r['hidiff_run']['iterations']} / "
                         f"{r['alone_run']['iterations']} | {r['steps']} steps x {r['samples']}"
                         + (f" ({r.get('estimate', 'last')})" if r["steps"] > 1 else "")
                         + " | " + " | ".join(_fmt(r["dice"][k]) for k, _ in PREDICTORS) + " |")
        if len(runs) > 1:
            means = {k: float(np.mean([r["dice"][k] for r in runs if r["dice"][k] is not None]))
                     for k, _ in PREDICTORS}
            lines.append(f"| mean of {len(runs)} | | | "
                         + " | ".join(_fmt(means[k]) for k, _ in PREDICTORS) + " |")
        lines.append("")
        lines += _refined_table(runs)
        sec = runs[0]["seconds_per_case"]
        lines += ["Seconds per test case (first seed, this machine, whole-image inference in "
                  "torch): " + ", ".join(f"{label} {sec[k]:.3f}" for k, label in PREDICTORS
                                         if sec.get(k) is not None), ""]
        for est in dict.fromkeys(r.get("estimate", "last") for r in runs[0].get("sweep") or []):
            rows = [r for r in runs[0]["sweep"] if r.get("estimate", "last") == est]
            samples = sorted({r["samples"] for r in rows})
            lines += [f"HiDiff binary, seed {runs[0]['seed']}, `{est}` estimate of each chain: "
                      "Dice (s/case) per sampling steps x chains S", "",
                      "| steps \\ S | " + " | ".join(map(str, samples)) + " |",
                      "|---|" + "---|" * len(samples)]
            for steps in sorted({r["steps"] for r in rows}):
                cells = []
                for s in samples:
                    hit = [r for r in rows if r["steps"] == steps and r["samples"] == s]
                    cells.append(f"{hit[0]['dice']:.4f} ({hit[0]['s_per_case']:.2f})" if hit
                                 else "")
                lines.append(f"| {steps} | " + " | ".join(cells) + " |")
            lines.append("")
        if res.get("reused"):
            lines += ["Reused from the run folders (`--reuse`; evaluated by this script in an "
                      "earlier invocation, same code path): " + ", ".join(
                          f"`{r}`" for r in res["reused"]) + ".", ""]
    return "\n".join(lines) + "\n"
