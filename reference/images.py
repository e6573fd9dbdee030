"""Inference preprocessing, once for every runtime: resizing, normalisation, tiles and stitching.

NumPy only, so that the torch pipeline and the torch-free edge runtime share one definition.
Images are HWC float arrays in [0, 1]; masks are HW uint8 label maps.

Resizing is Pillow's ``Image.resize`` algorithm on float32 planes (mode ``F``), the resize the
models were trained with (``hidiff.data.transforms``), written out so that it needs no Pillow:

- ``bilinear``: separable, horizontal pass first. Output pixel ``o`` of a pass from ``n_in`` to
  ``n_out`` samples centres a triangle filter at ``c = (o + 1/2) s`` with ``s = n_in / n_out``,
  widened to support ``f = max(s, 1)`` when shrinking (so it averages instead of skipping), over
  inputs ``i`` in ``[trunc(c - f + 1/2), trunc(c + f + 1/2))`` clipped to the image, weights
  ``w_i = max(0, 1 - |i - c + 1/2| / f)`` normalised to sum 1. Each output is the float64 sum
  ``sum_i w_i x_i`` in increasing ``i``, rounded to float32 (the intermediate image is float32).
  Each pass alone equals Pillow's bit for bit; Pillow sometimes runs the two passes of a 2-D
  resize in the other order, so 2-D results can differ from Pillow's by one float32 rounding.
- ``nearest`` (label maps): output pixel ``o`` takes input ``trunc(x_o)`` where
  ``x_0 = s / 2`` and ``x_{o+1} = x_o + s`` (accumulated in float64, as Pillow does).

Tiles: starts at stride ``tile - overlap`` with the last tile flush with the far edge; an image
smaller than a tile is zero-padded at the bottom / right; stitching averages overlapping tiles
in float64, so tiles cut from one image stitch back to it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "extract_tiles", "normalize", "resize_labels", "resize_planes", "stitch_tiles",
    "tile_starts",
]


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights ``(n_out, taps)`` of one bilinear pass (module docstring);
    unused taps have weight 0 and a valid index."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    taps = 2 * math.ceil(support) + 1
    index = np.zeros((n_out, taps), dtype=np.intp)
    weight = np.zeros((n_out, taps), dtype=np.float64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        w = [max(0.0, 1.0 - abs((i - centre + 0.5) * (1.0 / support))) for i in range(lo, hi)]
        total = 0.0
        for value in w:  # left to right, the float64 accumulation it reproduces
            total += value
        for j, value in enumerate(w):
            index[o, j] = lo + j
            weight[o, j] = value / total if total != 0.0 else value
    return index, weight


def _bilinear_pass(planes: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    index, weight = _bilinear_taps(planes.shape[axis], n_out)
    shape = [1] * planes.ndim
    shape[axis] = n_out
    total = np.zeros(planes.shape[:axis] + (n_out,) + planes.shape[axis + 1:], dtype=np.float64)
    for j in range(index.shape[1]):
        total += (np.take(planes, index[:, j], axis=axis).astype(np.float64)
                  * weight[:, j].reshape(shape))
    return total.astype(np.float32)


def resize_planes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an HW or HWC float array to ``(height, width)``, each channel on its
    own (float32; Pillow's mode-``F`` algorithm, module docstring)."""
    planes = np.asarray(planes, dtype=np.float32)
    if planes.ndim not in (2, 3):
        raise ValueError(f"expected an HW or HWC array; got shape {planes.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"output size must be positive; got {height}x{width}")
    out = planes
    if planes.shape[1] != width:
        out = _bilinear_pass(out, width, axis=1)
    if planes.shape[0] != height:
        out = _bilinear_pass(out, height, axis=0)
    return out.copy() if out is planes else out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    step = n_in / n_out
    pos, index = step * 0.5, np.empty(n_out, dtype=np.intp)
    for o in range(n_out):
        index[o] = min(int(pos), n_in - 1)
        pos += step
    return index


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 label map (labels stay labels; equal to Pillow's)."""
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim != 2:
        raise ValueError(f"expected an HW label map; got shape {labels.shape}")
    if labels.shape == (height, width):
        return labels.copy()
    rows = _nearest_index(labels.shape[0], height)
    cols = _nearest_index(labels.shape[1], width)
    return np.ascontiguousarray(labels[rows][:, cols])


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(image - mean) / std`` per channel (last axis), in float32."""
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    return ((np.asarray(image, dtype=np.float32) - mean_a) / std_a).astype(np.float32)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``: stride ``tile - overlap``, last flush.

    ``length <= tile`` gives ``[0]`` (one tile, padded by :func:`extract_tiles`).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile; got tile={tile}, "
                         f"overlap={overlap}")
    if length < 1:
        raise ValueError(f"length must be >= 1; got {length}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def extract_tiles(image: np.ndarray, tile: int, overlap: int,
                  ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles ``(N, tile, tile[, C])`` of an HW / HWC array (row-major order) and their
    ``(y, x)`` starts."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an HW or HWC array; got shape {image.shape}")
    height, width = image.shape[:2]
    pad = [(0, max(0, tile - height)), (0, max(0, tile - width))] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad) if any(p[1] for p in pad) else image
    starts = [(y, x) for y in tile_starts(height, tile, overlap)
              for x in tile_starts(width, tile, overlap)]
    tiles = np.stack([padded[y:y + tile, x:x + tile] for y, x in starts])
    return tiles, starts


def stitch_tiles(tiles: np.ndarray, starts: Sequence[tuple[int, int]], shape: Sequence[int],
                 *, channels_first: bool = False) -> np.ndarray:
    """Average overlapping tiles back into an array of spatial ``shape`` ``(H, W)``.

    ``tiles`` is ``(N, th, tw, ...)``, or ``(N, C, th, tw)`` with ``channels_first`` (network
    output; the result is then ``(C, H, W)``). Sums run in float64, so tiles cut from one image
    reproduce it exactly; the result is float32 (float64 if the tiles are float64).
    """
    tiles = np.asarray(tiles)
    if channels_first:
        tiles = np.moveaxis(tiles, 1, -1)
    if len(tiles) != len(starts):
        raise ValueError(f"{len(tiles)} tiles but {len(starts)} starts")
    height, width = int(shape[0]), int(shape[1])
    tile_h, tile_w = tiles.shape[1:3]
    canvas_h = max(height, max(y for y, _ in starts) + tile_h)
    canvas_w = max(width, max(x for _, x in starts) + tile_w)
    total = np.zeros((canvas_h, canvas_w) + tiles.shape[3:], dtype=np.float64)
    count = np.zeros((canvas_h, canvas_w), dtype=np.float64)
    for piece, (y, x) in zip(tiles, starts, strict=True):
        total[y:y + tile_h, x:x + tile_w] += piece
        count[y:y + tile_h, x:x + tile_w] += 1.0
    count = count[:height, :width]
    if not np.all(count > 0):
        raise ValueError(f"tiles do not cover the {height}x{width} output")
    out = total[:height, :width] / count.reshape(count.shape + (1,) * (total.ndim - 2))
    out = out.astype(np.float64 if tiles.dtype == np.float64 else np.float32)
    return np.moveaxis(out, -1, 0) if channels_first else out
