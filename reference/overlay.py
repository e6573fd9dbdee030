"""A prediction drawn over its image, for a person to look at (NumPy only).

:func:`overlay` fills each foreground class of the predicted mask semi-transparently
(``(1 - ALPHA) * image + ALPHA * colour``, class k in ``CLASS_COLOURS[(k - 1) % 5]``), draws
its contour in the class colour, and the ground truth's contour in :data:`GT_COLOUR`. Contours
are the mask pixels with a 4-neighbour outside the mask (the surface of
:mod:`reference.metrics`), thickened to ``thickness`` pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ALPHA", "CLASS_COLOURS", "GT_COLOUR", "contour", "overlay"]

GT_COLOUR = (0, 255, 0)
#: fill / contour colour of foreground class k is CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]
CLASS_COLOURS = ((255, 48, 48), (48, 128, 255), (255, 200, 0), (255, 0, 255), (0, 255, 255))
ALPHA = 0.4


def contour(mask: np.ndarray, *, thickness: int = 2) -> np.ndarray:
    """Boolean contour of a boolean HW mask: pixels with a 4-neighbour outside, thickened."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    edge = m & ~(p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    for _ in range(max(0, thickness - 1)):
        q = np.pad(edge, 1, constant_values=False)
        edge = edge | q[:-2, 1:-1] | q[2:, 1:-1] | q[1:-1, :-2] | q[1:-1, 2:]
    return edge


def overlay(rgb: np.ndarray, mask: np.ndarray | None, gt: np.ndarray | None = None, *,
            thickness: int = 2) -> np.ndarray:
    """uint8 RGB ``rgb`` (H, W, 3; a grey (H, W, 1) image is drawn on as RGB) with the label
    map ``mask`` (H, W; None: none) filled and outlined and the ground-truth label map ``gt``
    outlined (module docstring)."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"overlay needs a uint8 H x W x 3 image; got {rgb.dtype} {rgb.shape}")
    for name, labels in (("mask", mask), ("ground truth", gt)):
        if labels is not None and np.shape(labels) != rgb.shape[:2]:
            raise ValueError(f"{name} has shape {np.shape(labels)}, the image {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    if mask is not None:
        mask = np.asarray(mask)
        for k in [int(v) for v in np.unique(mask) if v != 0]:
            colour = np.asarray(CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], dtype=np.float32)
            sel = mask == k
            out[sel] = (1.0 - ALPHA) * out[sel] + ALPHA * colour
            out[contour(sel, thickness=thickness)] = colour
    if gt is not None:
        out[contour(np.asarray(gt) != 0, thickness=thickness)] = GT_COLOUR
    return out.astype(np.uint8)
