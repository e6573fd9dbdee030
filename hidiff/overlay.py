"""Side-by-side overlay pictures of predictions, for a person to look at (PIL only).

:func:`overlay_figure` puts panels next to each other, all at the same display height:

1. the image with the ground-truth contour (green);
2. one panel per predictor: the image with the predicted mask filled semi-transparently (one colour
   per foreground class), its contour in the class colour, and the ground-truth contour in green.

Each panel has a caption strip on top (e.g. ``"HiDiff binary  Dice 0.871"``). Contours are the
mask pixels with a 4-neighbour outside the mask (the surface of :mod:`reference.metrics`),
thickened to two pixels, drawn after resizing so they stay visible on large images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CLASS_COLOURS", "GT_COLOUR", "contour", "overlay_figure", "save_overlay"]

GT_COLOUR = (0, 255, 0)
#: fill / contour colour of foreground class k is CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]
CLASS_COLOURS = ((255, 48, 48), (48, 128, 255), (255, 200, 0), (255, 0, 255), (0, 255, 255))
_ALPHA = 0.4
_CAPTION_H = 22


def contour(mask: np.ndarray, *, thickness: int = 2) -> np.ndarray:
    """Boolean contour of a boolean HW mask: pixels with a 4-neighbour outside, thickened."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    edge = m & ~(p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    for _ in range(max(0, thickness - 1)):
        q = np.pad(edge, 1, constant_values=False)
        edge = edge | q[:-2, 1:-1] | q[2:, 1:-1] | q[1:-1, :-2] | q[1:-1, 2:]
    return edge


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except (TypeError, OSError):  # no FreeType: the bitmap default
        return ImageFont.load_default()


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return (np.clip(image[..., :3], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.NEAREST))


def _panel(
    base: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None, caption: str, font
) -> Image.Image:
    out = base.astype(np.float32)
    if pred is not None:
        for k in [int(v) for v in np.unique(pred) if v != 0]:
            colour = np.asarray(CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], dtype=np.float32)
            sel = pred == k
            out[sel] = (1.0 - _ALPHA) * out[sel] + _ALPHA * colour
            out[contour(sel)] = colour
    if gt is not None:
        out[contour(gt != 0)] = GT_COLOUR
    body = Image.fromarray(out.astype(np.uint8))
    panel = Image.new("RGB", (body.width, body.height + _CAPTION_H), (0, 0, 0))
    panel.paste(body, (0, _CAPTION_H))
    ImageDraw.Draw(panel).text((4, 3), caption, fill=(255, 255, 255), font=font)
    return panel


def overlay_figure(
    image: np.ndarray,
    gt: np.ndarray | None,
    predictions: Sequence[tuple[str, np.ndarray]],
    *,
    height: int = 256,
    title: str = "ground truth",
) -> Image.Image:
    """The panels (see module docstring) as one RGB image of display ``height`` (+ captions).

    ``image``: HWC (or HW) float in [0, 1]; ``gt`` and each prediction: HW label maps of the same
    size (0 = background); ``predictions``: ``(caption, mask)`` pairs in panel order.
    """
    h, w = np.asarray(image).shape[:2]
    width = max(1, round(w * height / h))
    size = (width, height)
    base = np.asarray(Image.fromarray(_rgb_uint8(image)).resize(size, Image.Resampling.BILINEAR))
    gt_small = None if gt is None else _resize_labels(gt, size)
    font = _font()
    panels = [_panel(base, gt_small, None, title, font)]
    for caption, mask in predictions:
        if np.asarray(mask).shape != (h, w):
            raise ValueError(f"mask of {caption!r} has shape {np.asarray(mask).shape}, "
                             f"image is {(h, w)}")
        panels.append(_panel(base, gt_small, _resize_labels(mask, size), caption, font))
    gap = 4
    figure = Image.new(
        "RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height),
        (255, 255, 255),
    )
    x = 0
    for p in panels:
        figure.paste(p, (x, 0))
        x += p.width + gap
    return figure


def save_overlay(path: str | Path, image: np.ndarray, gt: np.ndarray | None,
                 predictions: Sequence[tuple[str, np.ndarray]], **kwargs) -> Path:
    """:func:`overlay_figure` written as a PNG to ``path`` (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        overlay_figure(image, gt, predictions, **kwargs).save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
