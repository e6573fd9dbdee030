"""The training options of the command line, defined once for ``hidiff train`` and
``python -m hidiff.training`` (the torchrun entry point).

Every option maps to the keyword of :func:`hidiff.training.train` with the same name; an option
not given leaves that function's default in force.
"""

from __future__ import annotations

import argparse
from typing import Any

from hidiff.config import OFFSETS, list_presets
from hidiff.data.readers import available_readers
from hidiff.training.lr_schedule import SEGMENTOR_SCHEDULES
from hidiff.training.setup import Y0_TERMS

__all__ = ["add_train_arguments", "train_kwargs"]


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of :func:`hidiff.training.train` to ``p``."""
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(available_readers())}")
    p.add_argument("--data", required=True, help="the dataset folder")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(list_presets())}")
    p.add_argument("--out", required=True, help="model folder (new or empty, or --resume)")
    p.add_argument("--max-steps", type=pos, help="total iterations (counting resumed ones)")
    p.add_argument("--max-minutes", type=float,
                   help="limit on the run's training time in minutes, time before a resume "
                        "included (like --max-steps: raise it to go on from a finished run)")
    p.add_argument("--batch-size", type=pos, help="per process (default by preset)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm (default 1); 0 = off")
    p.add_argument("--seed", type=nonneg, help="seed of init, data order and draws (default 0)")
    p.add_argument("--pretrain-steps", type=nonneg,
                   help="first iterations train the segmentor on L_seg alone (default 0)")
    p.add_argument("--pretrain-minutes", type=float,
                   help="train the segmentor alone for this much of the training time first "
                        "(default 0)")
    p.add_argument("--fp-twin", dest="train_fp_twin", action="store_true", default=None,
                   help="also train the full-precision twin refiner (an ablation; off by default)")
    p.add_argument("--no-fp-twin", dest="train_fp_twin", action="store_false",
                   help="do not train the full-precision twin (the default)")
    p.add_argument("--lambda-diff", type=float,
                   help="weight of L_diff in the segmentor phase (default 1; 0 = no collaboration)")
    p.add_argument("--offset", choices=OFFSETS,
                   help="refiner output form: bayes (default; starts at the segmentor) or none")
    p.add_argument("--self-align", type=float, metavar="R",
                   help="fraction of refiner samples trained on y_t built from the refiner's own "
                        "estimate (default 0.5)")
    p.add_argument("--refiner-holdout", type=float, metavar="F",
                   help="fraction of the train cases kept from the segmentor for the refiner "
                        "phase (default 0)")
    p.add_argument("--lambda-y0", type=float, metavar="W",
                   help="weight of the cross-entropy of the refiner's y0 estimate in the diffusion "
                        "loss (refiner's, and the segmentor's through --lambda-diff) "
                        "(default 1; 0 = off)")
    p.add_argument("--y0-term", choices=Y0_TERMS,
                   help="where the y0 cross-entropy acts: the diffusion loss of both phases "
                        "(default) or the refiner's only")
    p.add_argument("--segmentor-schedule", choices=SEGMENTOR_SCHEDULES,
                   help="segmentor learning rate: cosine (default), annealed to 0 where the "
                        "segmentor's training ends, or constant")
    for unit, kind, var, start in (
            ("steps", nonneg, "N", "iteration N"),
            ("minutes", float, "M", "M minutes of training time (resumed included)")):
        p.add_argument(f"--refine-after-{unit}", type=kind, metavar=var,
                       help=f"from {start} on, train the refiner alone with the segmentor frozen "
                            "(default: never; on --resume a given value replaces the stored one)")
    p.add_argument("--resume", action="store_true", help="continue --out from its checkpoint")
    p.add_argument("--log-every", type=pos, help="iterations between log records (default 10)")
    p.add_argument("--checkpoint-every", type=pos,
                   help="iterations between checkpoints (default 100)")
    p.add_argument("--val-every", type=pos, help="validation Dice of the segmentor every N steps")
    p.add_argument("--num-workers", type=nonneg, help="DataLoader workers (default 0)")
    p.add_argument("--limit-cases", type=pos, help="train on the first N train cases only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar")


def train_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`hidiff.training.train` from parsed options."""
    names = ("dataset", "data", "preset", "out", "max_steps", "max_minutes", "batch_size", "lr",
             "weight_decay", "grad_clip", "seed", "pretrain_steps", "pretrain_minutes",
             "train_fp_twin", "lambda_diff", "offset", "self_align", "refiner_holdout", "lambda_y0",
             "y0_term", "segmentor_schedule", "refine_after_steps", "refine_after_minutes",
             "log_every", "checkpoint_every", "val_every", "num_workers", "limit_cases", "device")
    kwargs = {n: getattr(ns, n) for n in names if getattr(ns, n) is not None}
    if kwargs.get("grad_clip") == 0:
        kwargs["grad_clip"] = None
    kwargs["resume"] = bool(ns.resume)
    kwargs["progress"] = not ns.quiet
    return kwargs
