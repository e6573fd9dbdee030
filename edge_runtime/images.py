"""Images in and masks out: reading, checking, resizing, tiling (PIL + NumPy, no hidiff).

The model takes 8-bit colour images (``in_channels`` channels, RGB). :func:`read_image` refuses,
with an :class:`~edge_runtime.errors.InputError` naming the file, anything else: an unreadable or
missing file, a 16-bit image (PIL would silently cut a 48-bit PNG to 8 bits), a grayscale one,
a float / 32-bit integer one. :func:`as_float_image` accepts an in-memory HWC array: uint8, or
float in [0, 1].

The preprocessing equals the torch pipeline's (``hidiff.data.transforms``): bilinear resizing
of float32 planes with PIL (mode ``F``), ``(x - mean) / std`` in float32, nearest-neighbour
resizing of label maps, and for whole-image (tile) prediction the same tile grid (stride
``tile - overlap``, last tile flush with the far edge, zero padding bottom/right only when the
image is smaller than a tile) and float64 averaging where tiles overlap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

__all__ = [
    "IMAGE_SUFFIXES", "as_float_image", "extract_tiles", "normalize", "read_image",
    "resize_labels", "resize_planes", "stitch_tiles", "tile_starts", "write_png",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
_COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "RGBX")
_GREY_MODES = ("L", "LA", "1", "La")


def _rawmodes(img: Image.Image) -> list[str]:
    modes = []
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if isinstance(tile, tuple) else getattr(tile, "args", None)
        if isinstance(args, tuple):
            args = args[0] if args else None
        if isinstance(args, str):
            modes.append(args)
    return modes


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """An 8-bit colour image file as uint8 HWC with ``channels`` channels (alpha dropped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such image file")
    try:
        with Image.open(path) as img:
            mode = img.mode
            deep = [m for m in _rawmodes(img) if ";16" in m or ";32" in m]
            if mode.startswith(("I;16", "I")) or mode == "F" or deep:
                bits = "16-bit" if (mode.startswith("I;16") or any(";16" in m for m in deep)) \
                    else f"{mode}-mode (32-bit)"
                raise InputError(path, f"{bits} image; the model takes 8-bit colour images "
                                       f"(convert it to 8-bit RGB first)")
            if mode in _GREY_MODES:
                raise InputError(path, f"grayscale image (mode {mode}); the model takes "
                                       f"{channels}-channel colour (RGB) images")
            if mode not in _COLOUR_MODES:
                raise InputError(path, f"unsupported image mode {mode}")
            img.load()
            array = np.asarray(img.convert("RGB") if mode != "RGB" else img)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise InputError(path, f"unreadable or corrupt image file ({type(err).__name__}: {err})"
                         ) from err
    if array.ndim != 3 or array.shape[-1] != channels or array.dtype != np.uint8:
        raise InputError(path, f"image has shape {array.shape} ({array.dtype}); expected "
                               f"H x W x {channels} 8-bit")
    return np.ascontiguousarray(array)


def as_float_image(image: np.ndarray, channels: int = 3) -> np.ndarray:
    """HWC uint8 (/255) or float in [0, 1] -> float32 HWC in [0, 1] (checked)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != channels:
        what = "grayscale (2-D)" if image.ndim == 2 else f"shape {image.shape}"
        raise InputError(None, f"image must be H x W x {channels} (RGB); got {what}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        raise InputError(None, "16-bit image arrays are not supported; pass uint8 or float in "
                               "[0, 1]")
    if not np.issubdtype(image.dtype, np.floating):
        raise InputError(None, f"unsupported image dtype {image.dtype}; pass uint8 or float in "
                               "[0, 1]")
    out = image.astype(np.float32)
    if not np.all(np.isfinite(out)) or out.size and (out.min() < 0 or out.max() > 1):
        raise InputError(None, "float image values must be finite and in [0, 1]")
    return out


def resize_planes(planes: np.ndarray, height: int, width: int, *,
                  resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize an HW or HWC float array plane by plane (PIL mode ``F``, no 8-bit rounding)."""
    planes = np.asarray(planes, dtype=np.float32)
    if planes.shape[:2] == (height, width):
        return planes.copy()
    stack = planes[..., None] if planes.ndim == 2 else planes
    out = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(stack[..., c])).resize(
            (width, height), resample))
        for c in range(stack.shape[-1])
    ], axis=-1)
    return out[..., 0] if planes.ndim == 2 else out


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 label map."""
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.shape == (height, width):
        return labels.copy()
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(image - mean) / std`` per channel (last axis), float32."""
    return ((np.asarray(image, np.float32) - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32)).astype(np.float32)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering ``[0, length)``: stride ``tile - overlap``, the last one flush."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile; got {tile}, {overlap}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def extract_tiles(image: np.ndarray, tile: int, overlap: int,
                  ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles ``(N, tile, tile, C)`` of an HWC array (row-major order) and their starts."""
    height, width = image.shape[:2]
    pad = [(0, max(0, tile - height)), (0, max(0, tile - width))] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad) if any(p[1] for p in pad) else image
    starts = [(y, x) for y in tile_starts(height, tile, overlap)
              for x in tile_starts(width, tile, overlap)]
    return np.stack([padded[y:y + tile, x:x + tile] for y, x in starts]), starts


def stitch_tiles(tiles: np.ndarray, starts: Sequence[tuple[int, int]],
                 shape: tuple[int, int]) -> np.ndarray:
    """Average ``(N, C, th, tw)`` tiles into ``(C, H, W)`` (float64 sums)."""
    n, channels, th, tw = tiles.shape
    height, width = shape
    canvas = (max(height, max(y for y, _ in starts) + th),
              max(width, max(x for _, x in starts) + tw))
    total = np.zeros((channels, *canvas), dtype=np.float64)
    count = np.zeros(canvas, dtype=np.float64)
    for piece, (y, x) in zip(tiles, starts, strict=True):
        total[:, y:y + th, x:x + tw] += piece
        count[y:y + th, x:x + tw] += 1.0
    out = total[:, :height, :width] / count[None, :height, :width]
    return out if tiles.dtype == np.float64 else out.astype(np.float32)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write a PNG atomically (a hidden temporary name in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        mode = "L" if pixels.ndim == 2 else "RGB"
        Image.fromarray(np.ascontiguousarray(pixels), mode=mode).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
