"""Overlapping tiles over a whole image and back (vessel images are predicted at native size).

``extract_tiles`` cuts an HW or HWC array into ``tile`` x ``tile`` pieces whose starts come from
``tile_starts`` (stride ``tile - overlap``; the last tile is aligned to the far edge, so no
padding is needed unless the image is smaller than a tile, where it is zero-padded at the
bottom/right). ``stitch_tiles`` puts per-tile predictions back, averaging where tiles overlap;
tiles of the image itself stitch back to the image exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    """Tiles ``(N, tile, tile[, C])`` of an HW / HWC array and their ``(y, x)`` starts."""
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
