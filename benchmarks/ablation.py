"""Refiner ablation on the val split: which training and sampling levers make HiDiff beat its
segmentor. Settings of the product (offset, self-align, steps, S) are chosen from this report,
never from the test split.

    python benchmarks/ablation.py --data ../shared/data/Kvasir-SEG --segmentor runs/seg12 \\
        --variant none:offset=none --variant bayes --variant bayes_sa:self_align=0.5
    python benchmarks/ablation.py --quick --results /tmp/ablation      # a smoke run (CI)

The segmentor is a model folder trained on L_seg alone (e.g. ``hidiff train ... --preset
cpu-small --pretrain-steps 100000 --max-minutes 12 --lr 1e-3``); it stays frozen. Each variant
trains a fresh binary refiner on its outputs for ``--iters`` refiner-phase iterations (batch 8,
AdamW ``--lr``, the same seed, data order and diffusion draws for every variant), then the val
split is predicted at the model resolution for every (steps, S) of ``--grid`` with seed 0, and
the Dice (mean over val cases) is reported next to the segmentor's. A variant is
``NAME[:key=value,...]`` with keys ``offset`` (bayes | none), ``self_align`` (0..1),
``lambda_y0`` (weight of a cross-entropy term on y0_hat), ``ema`` (decay of an exponential
moving average of the refiner's weights, evaluated instead of the last weights) and
``prior_noise`` (std of the smooth logit-space perturbation of the training prior,
``hidiff.training.steps.perturbed_prior``) and ``train_on`` (``seen``: the refiner trains on the
segmentor's own training cases, where its priors are nearly right; ``unseen``: on the cases of
the dataset's committed train split that the segmentor was *not* trained on, e.g. those cut by
``hidiff train --limit-cases``, where its priors are as wrong as on new images) and ``t_focus``
(probability that a sample's t is set to T, the step one-step sampling evaluates;
``StepSettings.t_focus``) and ``warmup`` (the refiner's learning rate ramps linearly from
``lr / warmup`` to ``lr`` over its first ``warmup`` iterations). Results:
``<results>.md`` / ``.json``; the trained refiners stay in ``--out/<name>/refiner.pt`` with
``result.json`` (``--reuse`` takes a variant's result from there when it covers the grid and
the estimate, else re-evaluates its refiner). ``refiner=own`` trains nothing: the refiner of the
``--segmentor`` folder itself (a HiDiff model trained by alternating) is evaluated, with its own
offset; the other keys must then keep their defaults. ``--estimate`` picks how each chain's
estimate is formed (``last`` y0_hat, or the ``trajectory`` mean over its steps;
:func:`reference.reverse_process`) for every variant of the run:

    python benchmarks/ablation.py --segmentor runs/acc_y0/kvasir-seg/seed0/hidiff \
        --variant own:refiner=own --estimate trajectory --out runs/est_s0 --results runs/est_s0_t
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hidiff.data import default_split, get_reader
from hidiff.data.torch_dataset import SegmentationDataset
from hidiff.diffusion import BernoulliDiffusion
from hidiff.model_dir import build_networks, load_model_dir
from hidiff.pipeline import HiDiffPipeline
from hidiff.training.steps import (
    DiffusionDraws,
    Networks,
    Optimizers,
    StepSettings,
    refiner_phase,
)
from reference.metrics import dice
from reference.sampling import ESTIMATES

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"offset": str, "self_align": float, "lambda_y0": float, "ema": float,
        "prior_noise": float, "train_on": str, "refiner": str, "t_focus": float, "warmup": int}
TRAIN_ON = ("seen", "unseen")
REFINERS = ("new", "own")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts = {"offset": "bayes", "self_align": 0.0, "lambda_y0": 0.0, "ema": 0.0,
            "prior_noise": 0.0, "train_on": "seen", "refiner": "new", "t_focus": 0.0,
            "warmup": 0}
    defaults = dict(opts)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise argparse.ArgumentTypeError(f"unknown variant key {key!r}; allowed: "
                                             f"{', '.join(KEYS)}")
        opts[key] = KEYS[key](value)
    if opts["train_on"] not in TRAIN_ON:
        raise argparse.ArgumentTypeError(f"train_on must be one of {', '.join(TRAIN_ON)}; "
                                          f"got {opts['train_on']!r}")
    if opts["refiner"] not in REFINERS:
        raise argparse.ArgumentTypeError(f"refiner must be one of {', '.join(REFINERS)}; "
                                          f"got {opts['refiner']!r}")
    if not 0.0 <= opts["t_focus"] <= 1.0:
        raise argparse.ArgumentTypeError(f"t_focus must be in [0, 1]; got {opts['t_focus']!r}")
    if opts["warmup"] < 0:
        raise argparse.ArgumentTypeError(f"warmup must be >= 0; got {opts['warmup']!r}")
    changed = [k for k in opts if k != "refiner" and opts[k] != defaults[k]]
    if opts["refiner"] == "own" and changed:
        raise argparse.ArgumentTypeError(f"refiner=own trains nothing; {', '.join(changed)} "
                                          "would be ignored")
    return name, opts


def refiner_cases(model, cases, train_on: str) -> list:
    """The refiner's training cases: the segmentor's own (``seen``) or the committed train
    split's cases that the segmentor's folder does not list as trained on (``unseen``)."""
    seen = model.split.select(cases, "train")
    if train_on == "seen":
        return seen
    ids = {c.case_id for c in seen}
    unseen = [c for c in default_split(model.dataset_info.name, cases).select(cases, "train")
              if c.case_id not in ids]
    if not unseen:
        raise ValueError("train_on=unseen: the segmentor was trained on every case of the "
                         "committed train split (train it with --limit-cases to hold some out)")
    return unseen


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (integer
    buffers are copied): ``ema = decay * ema + (1 - decay) * current`` after every step."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)


def train_refiner(model, cases, opts: dict, args, out: Path) -> dict:
    cfg = model.config.replace(refiner=dataclasses.replace(model.config.refiner,
                                                           offset=opts["offset"]))
    # the initial weights of a fresh process that seeds torch, loads the segmentor's folder
    # (which builds its networks) and then builds the refiner: the same for every variant
    torch.manual_seed(args.seed)
    build_networks(model.config, fp_twin=model.refiner_fp is not None)
    _, ref, _ = build_networks(cfg, fp_twin=False)
    size = cfg.image_size
    train_cases = refiner_cases(model, cases, opts["train_on"])[:args.limit_train]
    train_set = SegmentationDataset(train_cases,
                                    model.dataset_info, train=True, size=size, crop=size,
                                    seed=args.seed, cache=True)
    nets = Networks(model.segmentor, ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=args.lr, weight_decay=0.01)
    warm = opts["warmup"]
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
             if warm else None)
    opts_ = Optimizers(torch.optim.AdamW(model.segmentor.parameters(), lr=0.0), opt)
    diff = BernoulliDiffusion.from_name(cfg.diffusion.schedule, cfg.diffusion.num_steps)
    draws = DiffusionDraws(cfg.diffusion.num_steps, args.seed)
    settings = StepSettings(parameterization=cfg.refiner.parameterization,
                            offset=opts["offset"], self_align=opts["self_align"],
                            lambda_y0=opts["lambda_y0"], prior_noise=opts["prior_noise"],
                            t_focus=opts["t_focus"])
    ema = EMA(ref, opts["ema"]) if opts["ema"] else None
    order_rng, order = np.random.default_rng(args.seed), []
    start = time.time()
    for it in range(args.iters):
        if len(order) < args.batch_size:
            order += list(order_rng.permutation(len(train_set)))
        idx, order = order[:args.batch_size], order[args.batch_size:]
        items = [train_set[i] for i in idx]
        x = torch.stack([b["image"] for b in items])
        y0 = torch.stack([b["mask"] for b in items])
        logs = refiner_phase(nets, opts_, diff, draws, x, y0, settings)
        if sched is not None:
            sched.step()
        if ema is not None:
            ema.update(ref)
        if not args.quiet and it % 50 == 0:
            print(f"  {out.name} it {it}: loss {logs['loss_refiner']:.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict() if ema is None else ema.state, out / "refiner.pt")
    return {"iters": args.iters, "seconds": round(time.time() - start, 1)}


def evaluate_val(model, ref, cfg, cases, grid, *, limit: int | None, estimate: str) -> dict:
    size = cfg.image_size
    val = SegmentationDataset(model.split.select(cases, "val")[:limit], model.dataset_info,
                              train=False, size=size, crop=size, cache=True)
    x = torch.stack([val[i]["image"] for i in range(len(val))])
    gt = np.stack([val[i]["mask"].numpy()[0] > 0.5 for i in range(len(val))])
    pipe = HiDiffPipeline(model.segmentor, ref.eval(), config=cfg,
                          dataset_info=model.dataset_info)

    def score(mask: np.ndarray) -> float:
        return float(np.nanmean([dice(mask[i].astype(bool), gt[i]) for i in range(len(gt))]))

    res = {"segmentor": score(pipe.predict(x, refiner=None).mask.numpy()), "cases": len(gt)}
    for steps, samples in grid:
        start = time.time()
        mask = pipe.predict(x, steps=steps, samples=samples, seed=0, batch_size=25,
                            estimate=estimate).mask
        res[f"{steps}x{samples}"] = {"dice": score(mask.numpy()),
                                     "s_per_case": (time.time() - start) / len(gt)}
    return res


def report(rows: list[dict], args) -> str:
    grid = [f"{s}x{k}" for s, k in args.grid]
    lines = ["# Refiner ablation on the Kvasir-SEG val split", "",
             f"Written by `benchmarks/ablation.py` on {time.strftime('%Y-%m-%d')}. Command:", "",
             "```", "python benchmarks/ablation.py " + " ".join(sys.argv[1:]), "```", "",
             f"Frozen segmentor `{args.segmentor}`; each refiner trained {args.iters} "
             f"iterations (batch {args.batch_size}, lr {args.lr}, seed {args.seed}; "
             "`refiner=own`: the folder's own refiner, not retrained); val Dice at the model "
             f"resolution, sampling seed 0, `{args.estimate}` estimate of each chain; columns "
             "are sampling steps x chains S.",
             "", "| variant | options | segmentor | " + " | ".join(grid) + " |",
             "|---|---|---|" + "---|" * len(grid)]
    for r in rows:
        cells = [f"{r['val'][g]['dice']:.4f}" if g in r["val"] else "" for g in grid]
        lines.append(f"| {r['name']} | {r['options']} | {r['val']['segmentor']:.4f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Seconds per case (model resolution, torch, this machine): "
              + ", ".join(f"{g} {rows[-1]['val'][g]['s_per_case']:.3f}" for g in grid
                          if g in rows[-1]["val"]), ""]
    return "\n".join(lines)


def parse_grid(text: str) -> list[tuple[int, int]]:
    """``"1x1,10x4"`` -> ``[(1, 1), (10, 4)]`` (sampling steps x chains S)."""
    return [tuple(int(v) for v in item.split("x")) for item in filter(None, text.split(","))]


def write_results(stem: str, rows: list[dict], markdown: str) -> None:
    """``<stem>.json`` (the command line and the rows) and ``<stem>.md``."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(stem + ".json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    Path(stem + ".md").write_text(markdown)
    print(f"wrote {stem}.md and .json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "Kvasir-SEG"))
    p.add_argument("--segmentor", help="model folder of the frozen segmentor (--quick trains a "
                                        "tiny one when absent)")
    p.add_argument("--variant", action="append", type=parse_variant, dest="variants")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=parse_grid, default=parse_grid("1x1,3x1,10x1,1x4,3x4,10x4,1x8"))
    p.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "ablation"))
    p.add_argument("--reuse", action="store_true", help="evaluate refiners already trained")
    p.add_argument("--estimate", choices=ESTIMATES, default="last",
                   help="each chain's estimate: its last y0_hat or the mean over its steps "
                        "(default last, what the earlier reports used)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 iterations, 8 cases")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.limit_train = args.limit_val = None
    if args.quick:
        args.iters, args.batch_size, args.limit_train, args.limit_val = 4, 2, 8, 4
        args.grid = [(1, 1), (2, 2)]
        args.out = str(Path(args.results).parent / "ablation-quick-runs")
    variants = args.variants or [parse_variant("bayes")]
    if args.quick and not args.variants:  # the quick segmentor sees 8 cases: unseen runs too
        variants += [parse_variant("bayes_unseen:train_on=unseen"),
                     parse_variant("own:refiner=own"),
                     parse_variant("focus_warm:t_focus=0.5,warmup=2")]
    if args.segmentor is None:
        if not args.quick:
            p.error("--segmentor is required (a model folder trained on L_seg alone)")
        from hidiff.training import train

        args.segmentor = str(Path(args.out) / "segmentor-quick")
        if not (Path(args.segmentor) / "checkpoint.pt").is_file():
            train(dataset="kvasir-seg", data=args.data, preset="tiny", out=args.segmentor,
                  max_steps=4, pretrain_steps=4, batch_size=2, limit_cases=8, lr=1e-2,
                  progress=False)
    model = load_model_dir(args.segmentor)
    _, cases = get_reader(model.dataset_info.name).open(args.data)
    rows = []
    for name, opts in variants:
        out = Path(args.out) / name
        grid = [f"{s}x{k}" for s, k in args.grid]
        if args.reuse and (out / "result.json").is_file():
            row = json.loads((out / "result.json").read_text())
            if (all(g in row["val"] for g in grid)
                    and row.get("estimate", "last") == args.estimate):
                rows.append(row)
                continue
        if opts["refiner"] == "own":
            run, cfg, ref = {"iters": model.step, "own": True}, model.config, model.refiner
            out.mkdir(parents=True, exist_ok=True)
        else:
            run = (json.loads((out / "train.json").read_text())
                   if args.reuse and (out / "refiner.pt").is_file()
                   else train_refiner(model, cases, opts, args, out))
            cfg = model.config.replace(refiner=dataclasses.replace(model.config.refiner,
                                                                   offset=opts["offset"]))
            _, ref, _ = build_networks(cfg, fp_twin=False)
            ref.load_state_dict(torch.load(out / "refiner.pt", weights_only=True))
        (out / "train.json").write_text(json.dumps(run))
        val = evaluate_val(model, ref, cfg, cases, args.grid, limit=args.limit_val,
                           estimate=args.estimate)
        shown = ({"refiner": "own", "offset": cfg.refiner.offset} if opts["refiner"] == "own"
                 else opts)
        rows.append({"name": name, "options": ", ".join(f"{k}={v}" for k, v in shown.items()),
                     "estimate": args.estimate, "train": run, "val": val})
        (out / "result.json").write_text(json.dumps(rows[-1], indent=1))
        print(json.dumps(rows[-1]), flush=True)
    write_results(args.results, rows, report(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
