"""Images in: reading and checking image files and arrays (PIL + NumPy, no hidiff).

The model takes 8-bit images with its ``in_channels`` channels: 3 (RGB; most models) or 1
(grayscale; e.g. a ``generic`` dataset whose ``dataset.json`` names one channel).
:func:`read_image` refuses, with an :class:`~edge_runtime.errors.InputError` naming the file,
anything else: an unreadable or missing file, a 16-bit image (PIL would silently cut a 48-bit PNG
to 8 bits), a grayscale one for an RGB model, a colour one (channels not all equal) for a
grayscale model, a float / 32-bit integer one. As the torch reader does, a 1-channel model takes
an RGB file whose three channels are equal (grey stored as RGB). Files are read with Pillow: a
TIFF it cannot decode (the official CVC-ClinicDB files, which ``hidiff`` reads with tifffile) is
refused as unreadable; convert it to PNG first. :func:`as_float_image` accepts an in-memory HWC
array (HW too for a 1-channel model): uint8, or float in [0, 1].

Everything after that (resize, normalise, tiles, stitching, the mask, PNG writing) is the
reference's, shared with the torch pipeline: :mod:`reference.images`,
:mod:`reference.whole_image`, :mod:`reference.files`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

__all__ = ["as_float_image", "read_image"]

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
    """An 8-bit image file as uint8 HWC with ``channels`` channels (3: RGB, 1: grayscale; alpha
    dropped), upright by its EXIF orientation (so the mask comes back in the frame a viewer
    shows)."""
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
            if mode in _GREY_MODES and channels != 1:
                raise InputError(path, f"grayscale image (mode {mode}); the model takes "
                                       f"{channels}-channel colour (RGB) images")
            if mode not in _COLOUR_MODES + _GREY_MODES:
                raise InputError(path, f"unsupported image mode {mode}")
            img.load()
            img = ImageOps.exif_transpose(img)  # upright, as a viewer shows it
            if mode in _GREY_MODES:
                array = np.asarray(img.convert("L") if mode != "L" else img)[..., None]
            else:
                array = np.asarray(img.convert("RGB") if mode != "RGB" else img)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise InputError(path, f"unreadable or corrupt image file ({type(err).__name__}: {err})"
                         ) from err
    if channels == 1 and array.shape[-1] == 3:
        if not (np.array_equal(array[..., 0], array[..., 1])
                and np.array_equal(array[..., 0], array[..., 2])):
            raise InputError(path, "colour image (its channels differ); the model takes "
                                   "1-channel grayscale images")
        array = array[..., :1]
    if array.ndim != 3 or array.shape[-1] != channels or array.dtype != np.uint8:
        raise InputError(path, f"image has shape {array.shape} ({array.dtype}); expected "
                               f"H x W x {channels} 8-bit")
    return np.ascontiguousarray(array)


def as_float_image(image: np.ndarray, channels: int = 3) -> np.ndarray:
    """HWC uint8 (/255) or float in [0, 1] -> float32 HWC in [0, 1] (checked); for a
    1-channel model an HW array is taken as H x W x 1."""
    image = np.asarray(image)
    if channels == 1 and image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != channels:
        what = "grayscale (2-D)" if image.ndim == 2 else f"shape {image.shape}"
        kind = " (RGB)" if channels == 3 else ""
        raise InputError(None, f"image must be H x W x {channels}{kind}; got {what}")
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
