"""``python -m hidiff.training``: :func:`hidiff.training.train` from the command line.

    python -m hidiff.training --dataset kvasir-seg --data ../shared/data/Kvasir-SEG \\
        --preset cpu-small --out runs/kvasir --max-steps 500
    torchrun --nproc_per_node=2 -m hidiff.training ... (same arguments)

Exit status 0 on success, 2 for bad input (the message on stderr), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hidiff.cli import USER_ERRORS
from hidiff.config import list_presets
from hidiff.data.readers import available_readers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hidiff.training",
        description="Train a HiDiff model (segmentor + binarized refiner, alternately) into a "
                    "self-describing model folder.")
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(available_readers())}")
    p.add_argument("--data", required=True, help="the dataset folder")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(list_presets())}")
    p.add_argument("--out", required=True, help="model folder (new or empty, or --resume)")
    p.add_argument("--max-steps", type=int, help="total iterations (counting resumed ones)")
    p.add_argument("--max-minutes", type=float, help="wall-clock limit of this run")
    p.add_argument("--batch-size", type=int, help="per process (default by preset)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="first iterations train the segmentor on L_seg alone")
    p.add_argument("--no-fp-twin", dest="train_fp_twin", action="store_false",
                   help="do not train the full-precision twin refiner")
    p.add_argument("--lambda-diff", type=float, default=1.0,
                   help="weight of L_diff in the segmentor phase (0 = no collaboration)")
    p.add_argument("--resume", action="store_true", help="continue --out from its checkpoint")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--val-every", type=int, help="validation Dice of the segmentor every N steps")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--limit-cases", type=int, help="train on the first N train cases only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from hidiff.training.loop import train

    kwargs = vars(ns)
    kwargs["grad_clip"] = kwargs["grad_clip"] or None
    try:
        result = train(**kwargs)
    except USER_ERRORS as err:  # DataError, ModelDirError, argument and file errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result is not None and _is_main():
        print(f"{result.out}: step {result.step} ({result.stopped_by}), "
              f"{result.elapsed_s:.1f} s this run, losses {result.last_losses}"
              + ("" if result.val_dice is None else f", val Dice {result.val_dice:.4f}"))
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") in ("", "0")


if __name__ == "__main__":
    raise SystemExit(main())
