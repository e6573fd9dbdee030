"""Side-by-side overlay pictures of predictions, for a person to look at (PIL for the captions).

:func:`overlay_figure` puts panels next to each other, all at the same display height:

1. the image with the ground-truth contour (green);
2. one panel per predictor: the image with the predicted mask filled semi-transparently (one colour
   per foreground class), its contour in the class colour, and the ground-truth contour in green.

Each panel has a caption strip on top (e.g. ``"HiDiff binary  Dice 0.871"``). The panels are
:func:`reference.overlay.overlay` (the same drawing as ``hidiff-edge predict --overlay``), drawn
after resizing so the contours stay visible on large images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reference.images import resize_labels
from reference.overlay import overlay

__all__ = ["overlay_figure", "save_overlay"]

_CAPTION_H = 22


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


def _panel(
    base: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None, caption: str, font
) -> Image.Image:
    body = Image.fromarray(overlay(base, pred, gt))
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
    gt_small = None if gt is None else resize_labels(gt, height, width)
    font = _font()
    panels = [_panel(base, gt_small, None, title, font)]
    for caption, mask in predictions:
        if np.asarray(mask).shape != (h, w):
            raise ValueError(f"mask of {caption!r} has shape {np.asarray(mask).shape}, "
                             f"image is {(h, w)}")
        panels.append(_panel(base, gt_small, resize_labels(mask, height, width), caption,
                             font))
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
