"""``python -m hidiff.training``: :func:`hidiff.training.train` from the command line.

    python -m hidiff.training --dataset kvasir-seg --data ../shared/data/Kvasir-SEG \\
        --preset cpu-small --out runs/kvasir --max-steps 500
    torchrun --nproc_per_node=2 -m hidiff.training ... (same arguments)

Exit status 0 on success, 2 for bad input (the message on stderr), 1 when training diverges (a
non-finite loss), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hidiff.cli import USER_ERRORS
from hidiff.training.arguments import add_train_arguments, train_kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hidiff.training",
        description="Train a HiDiff model (segmentor + binarized refiner, alternately) into a "
                    "self-describing model folder (the options of `hidiff train`).")
    add_train_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from hidiff.training.loop import train
    from reference.memory import keep_freed_memory

    keep_freed_memory()  # each iteration reuses the pages of the one before

    try:
        result = train(**train_kwargs(ns))
    except USER_ERRORS as err:  # DataError, ModelDirError, argument and file errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # TrainingDiverged: a non-finite loss
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C; a signal after its checkpoint
        print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 128 + int(getattr(err, "signum", 2))
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
