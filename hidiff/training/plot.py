"""``training_curve.png``: losses (and validation Dice) against steps.

Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hidiff.model_dir import atomic_write

__all__ = ["plot_training_curve"]

PANELS = (
    ("refiner: L_diff", (("loss_refiner", "binary refiner"), ("loss_refiner_fp", "FP twin"))),
    ("segmentor", (("loss_seg", "L_seg"), ("loss_seg_diff", "L_diff via refiner"),
                   ("loss_segmentor", "L_seg + lambda L_diff"))),
    ("validation (segmentor alone)", (("val_dice", "Dice"),)),
)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_training_curve(records: Sequence[dict[str, Any]], path: str | Path,
                        *, title: str = "") -> Path | None:
    """Draw the panels that have data; write ``path`` atomically. None if nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, [(label, *_series(records, key)) for key, label in lines])
              for name, lines in PANELS]
    panels = [(name, [s for s in series if s[1]]) for name, series in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig = Figure(figsize=(5.0 * len(panels), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, steps, values in series:
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    return atomic_write(path, lambda f: f.write(data))
