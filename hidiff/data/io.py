"""Decoding image and mask files into arrays (numpy + PIL + tifffile; no torch).

Images come back float32 HWC in [0, 1] (uint8 / 255, uint16 / 65535); masks come back uint8
label maps HW (binary: 0/1). TIFF files are read with tifffile (PIL cannot open the official
CVC-ClinicDB TIFFs), everything else with PIL, turned upright by its EXIF orientation (a camera
JPEG stored rotated is read as a viewer shows it). Every failure is a ``DataError`` naming the
file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from hidiff.data.errors import DataError
from hidiff.data.info import Case, DatasetInfo
from reference.files import png_bit_depth

TIFF_SUFFIXES = (".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
# ITU-R 601-2 luma, the weights PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114])


def _read_tiff(path: Path, *, kind: str) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as err:  # tifffile raises many types (ValueError, KeyError, struct.error...)
        try:  # some TIFF flavours (e.g. JPEG-compressed without imagecodecs) PIL can still decode
            return _read_pil(path, kind=kind)
        except DataError:
            pass
        raise DataError(path, f"unreadable or corrupt TIFF file ({type(err).__name__}: {err})"
                        ) from err
    array = np.asarray(array)
    if array.size == 0 or array.ndim < 2:
        raise DataError(path, f"unreadable or corrupt TIFF file (no image data; shape "
                              f"{array.shape})")
    while array.ndim > 3 and array.shape[0] == 1:  # (1, H, W, C) pages / samples
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _read_pil(path: Path, *, kind: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if kind == "image" and png_bit_depth(path) == 16 and img.mode not in (
                    "L", "LA", "I", "I;16", "I;16B", "I;16L"):
                # one rule with hidiff-edge: Pillow would cut it to 8 bits silently
                raise DataError(path, "16-bit colour PNG; the model takes 8-bit colour images "
                                      "(convert it to 8-bit RGB first)")
            img.load()
            img = ImageOps.exif_transpose(img)  # upright, as a viewer shows it
            mode = img.mode
            if kind != "image":
                # Colour masks -> luma. Palette masks: the index is the label for "label" maps
                # (VOC-style PNGs); for "grey" masks (DRIVE GIFs) the palette colour's luma
                # counts, so a reordered palette cannot invert a mask. "1" stays bool.
                if mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr") or (
                        mode == "P" and kind == "grey"):
                    img = img.convert("L")
            elif mode in ("RGBA", "P", "PA", "CMYK", "YCbCr"):
                img = img.convert("RGB")
            elif mode == "LA":
                img = img.convert("L")
            array = np.array(img)
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise DataError(path, f"unreadable or corrupt image file ({type(err).__name__}: {err})"
                        ) from err
    return array


def read_array(path: str | Path, *, kind: str = "image") -> np.ndarray:
    """Decode one file into its raw array: HW or HWC, native dtype.

    ``kind``: ``"image"`` (colour modes -> RGB), ``"grey"`` (a mask: colour and palette -> luma)
    or ``"label"`` (a label map: palette indices kept, colour -> luma).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path, kind=kind)
    return _read_pil(path, kind=kind)


def _to_unit_float(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.uint16:
        return (array.astype(np.float64) / 65535.0).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32)
        if not np.all(np.isfinite(out)) or out.min() < 0 or out.max() > 1:
            raise DataError(path, f"floating-point image with values outside [0, 1] "
                                  f"(min {out.min()}, max {out.max()})")
        return out
    raise DataError(path, f"unsupported pixel type {array.dtype} (expected uint8, uint16, "
                          "bool or float in [0, 1])")


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read an image as float32 HWC in [0, 1] with exactly ``channels`` channels.

    A grayscale (2-D) file where RGB is expected is an error, as is any other channel count that
    does not match; an alpha channel is dropped. For ``channels == 1`` a 3-channel file whose
    channels are identical (grey stored as RGB) is accepted.
    """
    path = Path(path)
    array = read_array(path)
    if array.ndim == 2:
        if channels != 1:
            raise DataError(path, f"grayscale (2-D, {array.shape[0]}x{array.shape[1]}) image but "
                                  f"the dataset expects {channels} channels (RGB)")
        array = array[..., None]
    elif array.ndim == 3:
        if channels == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        elif (channels == 1 and array.shape[-1] in (3, 4)
              and np.array_equal(array[..., 0], array[..., 1])
              and np.array_equal(array[..., 0], array[..., 2])):
            array = array[..., :1]
        if array.shape[-1] != channels:
            raise DataError(path, f"image has {array.shape[-1]} channels but the dataset expects "
                                  f"{channels}")
    else:
        raise DataError(path, f"image array has shape {array.shape}; expected HxW or HxWxC")
    return np.ascontiguousarray(_to_unit_float(array, path))


def _half_range(array: np.ndarray) -> float:
    if array.dtype == np.uint16:
        return 32767.0
    if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
        return 0.5
    return 127.0


def _grey(array: np.ndarray, path: Path) -> np.ndarray:
    """A mask as one channel: 2-D as is, RGB(A) by luma (grey masks stored as colour images)."""
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return (array[..., :3].astype(np.float64) @ _LUMA).round()
    if array.ndim != 2:
        raise DataError(path, f"mask array has shape {array.shape}; expected HxW (or HxWx3)")
    return array


def read_mask(path: str | Path, info: DatasetInfo) -> np.ndarray:
    """Read a mask as a uint8 label map HW (binary datasets: values 0/1).

    ``info.mask_encoding == "threshold"`` (binary only): lossy (JPEG) files are thresholded at
    half range (> 127 for 8 bit); lossless files holding two levels {0, v} map v -> 1, other
    lossless grey levels are thresholded at half range too. ``"labels"``: the pixel values must
    be label values of ``info.labels`` (a binary mask may also be stored as {0, v}, e.g. 0/255);
    anything else is a ``DataError`` listing the unexpected values.
    """
    path = Path(path)
    kind = "grey" if info.mask_encoding == "threshold" else "label"
    array = _grey(read_array(path, kind=kind), path)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    lossy = path.suffix.lower() in LOSSY_SUFFIXES
    values = np.unique(array)
    two_level = values.size <= 2 and values[0] == 0
    binary = info.num_classes == 1
    if binary and (info.mask_encoding == "threshold" or lossy):
        if two_level and not lossy:
            return (array > 0).astype(np.uint8)
        return (array > _half_range(array)).astype(np.uint8)
    if lossy:
        raise DataError(path, "a lossy JPEG cannot hold exact label values of a multi-class "
                              "mask; store label maps as PNG or TIFF")
    allowed = np.asarray(info.label_values)
    if binary and two_level:
        return (array > 0).astype(np.uint8)
    bad = values[~np.isin(values, allowed)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10].tolist())
        raise DataError(path, f"mask has unexpected label values [{shown}]; the dataset's labels "
                              f"allow {allowed.tolist()} ({dict(info.labels)})")
    return array.astype(np.uint8)


def load_case(case: Case, info: DatasetInfo, *, mask_key: str | None = None,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32 HWC, [0, 1]) and mask (uint8 HW) of one case, sizes checked.

    ``mask_key`` picks another ground truth from ``case.extras`` (e.g. ``"2ndHO"``).
    """
    mask_path = case.mask if mask_key is None else case.extras.get(mask_key)
    if mask_path is None:
        raise DataError(case.image, f"case {case.case_id} has no {mask_key!r} file; it has "
                                    f"{sorted(case.extras)}")
    image = read_image(case.image, info.channels)
    mask = read_mask(mask_path, info)
    if image.shape[:2] != mask.shape:
        raise DataError(mask_path, f"mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs "
                                   f"from image {case.image.name} size "
                                   f"{image.shape[1]}x{image.shape[0]}")
    return image, mask
