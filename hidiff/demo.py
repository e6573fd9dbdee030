"""The main job in one call: train a small HiDiff on Kvasir-SEG, evaluate it, print the table.

``hidiff demo`` wraps :func:`run_demo`. On a 2-core CPU the default budget (8 minutes of training
on the ``cpu-small`` preset, then the segmentor alone and HiDiff on the 100 test images) finishes
in about 10 minutes. The numbers are those of a model trained for minutes, not the paper's: see
``benchmarks/results/accuracy.md`` for longer budgets.

The dataset is read from ``--data``, else ``$HIDIFF_DATA/Kvasir-SEG``, else
``../shared/data/Kvasir-SEG``. Kvasir-SEG is a public download (Jha et al., MMM 2020; search for
"Kvasir-SEG" on the Simula datasets site): unpack it so that the folder holds ``images/<id>.jpg``
and ``masks/<id>.jpg``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.errors import DataError

DEMO_PRESET = "cpu-small"
DEMO_MINUTES = 8.0
# Short CPU budgets: a larger step than the paper's 1e-4 (batch 32, hundreds of epochs), and the
# segmentor trained alone for most of the budget (a refiner phase costs about three segmentor
# steps, and the refiner can only refine an informative prior), then alternating training.
# The fraction was checked on the val split (benchmarks/results/ablation_levers.md, 2026-12-04,
# seed 0, one machine): HiDiff val Dice 0.7028 at 0.6, 0.7008 at 0.75, 0.6633 at 0.9.
DEMO_LR = 1e-3
DEMO_PRETRAIN_FRACTION = 0.6


def default_kvasir_path() -> Path:
    """``$HIDIFF_DATA/Kvasir-SEG`` if set, else ``../shared/data/Kvasir-SEG`` (from the cwd)."""
    base = os.environ.get("HIDIFF_DATA")
    return Path(base) / "Kvasir-SEG" if base else Path("..") / "shared" / "data" / "Kvasir-SEG"


@dataclass(frozen=True)
class DemoResult:
    model_dir: Path
    summary: dict[str, Any]
    table: str


def run_demo(
    *,
    data: str | Path | None = None,
    out: str | Path = "runs/demo",
    minutes: float = DEMO_MINUTES,
    preset: str = DEMO_PRESET,
    steps: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    resume: bool = False,
    fp_twin: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Train ``preset`` on Kvasir-SEG for ``minutes`` into ``out`` (the segmentor alone for the
    first 60 %, then alternating training), evaluate the segmentor alone and HiDiff with the
    binary refiner (and, with ``fp_twin``, the full-precision twin) on the test split at the
    model's default sampling (or ``steps`` / ``samples``), and return the summary and the
    printed table."""
    from .evaluation import evaluate, format_table
    from .training import train

    root = Path(data) if data is not None else default_kvasir_path()
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise DataError(
            root,
            "not a Kvasir-SEG folder (expected images/<id>.jpg and masks/<id>.jpg); download "
            "Kvasir-SEG (Jha et al., MMM 2020) and pass its folder with --data",
        )
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0; got {minutes}")
    result = train(
        dataset="kvasir-seg",
        data=root,
        preset=preset,
        out=out,
        max_minutes=minutes,
        lr=DEMO_LR,
        seed=seed,
        pretrain_minutes=DEMO_PRETRAIN_FRACTION * minutes,
        resume=resume,
        train_fp_twin=fp_twin,
        progress=progress,
    )
    summary = evaluate(result.out, data=root, split="test", steps=steps, samples=samples,
                       seed=seed, limit=limit, progress=progress)
    return DemoResult(Path(result.out), summary, format_table(summary))
