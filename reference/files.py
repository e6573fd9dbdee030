"""Image files in and mask PNGs out, once for every runtime (standard library + NumPy).

- :data:`IMAGE_SUFFIXES`: the image files a folder is searched for (case-insensitive);
- :func:`collect_images`: the files named on a command line, folders expanded (not
  recursively, hidden files skipped, natural order: ``img2`` before ``img10``), checked so that
  no two share a name stem (their outputs ``<stem>.png`` would collide);
- :func:`mask_pixels`: a label map as PNG pixels (0 / 255 for one foreground class, the labels
  themselves for several);
- :func:`atomic_write`: the one way every part of the project writes a file (a hidden
  temporary file ``.<name>.*.tmp`` in the same folder, fsynced, then ``os.replace``-d over the
  target), so a reader sees the old file or the new one, never half of one;
  :func:`atomic_write_bytes` for data in memory; :func:`remove_stale_temp_files` deletes what a
  killed writer left;
- :func:`write_png`: 8-bit grey or RGB PNG, written with :func:`atomic_write`;
- :func:`make_folder` / :func:`remove_made_folders`: an output folder created with its missing
  parents, and removed again (only those, only while empty) when a run fails, so a failed run
  leaves nothing behind.

The PNG encoder is the plain format (signature, ``IHDR``, one zlib-compressed ``IDAT`` with
filter type 0 on every row, ``IEND``; ISO/IEC 15948): lossless, readable by every decoder.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "atomic_write", "atomic_write_bytes", "collect_images", "encode_png",
           "image_files", "make_folder", "mask_pixels", "natural_key", "png_bit_depth",
           "remove_made_folders", "remove_stale_temp_files", "write_png"]

#: image files the runtimes read (lower case; matched case-insensitively)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

ErrorFactory = Callable[[Path, str], Exception]


def _value_error(path: Path, message: str) -> Exception:
    return ValueError(f"{path}: {message}")


def natural_key(text: str) -> list[object]:
    """Sort key putting ``img2`` before ``img10``: digit runs compare as numbers, before text
    (tagged, so a number never meets a string)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (no hidden files), in natural order."""
    return sorted((p for p in Path(folder).iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))


def collect_images(inputs: Sequence[str | Path], *, error: ErrorFactory = _value_error,
                   unique_stems: bool = True) -> list[Path]:
    """The image files named by ``inputs`` (files as given, folders expanded); stems unique
    unless ``unique_stems=False`` (inputs that produce no output files, e.g. calibration).

    Problems raise ``error(path, message)`` (default ``ValueError``), so each runtime reports
    them in its own exception type."""
    if not inputs:
        raise error(Path("."), "no input images given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                wanted = " ".join("*" + s for s in IMAGE_SUFFIXES)
                raise error(path, f"no image files ({wanted}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise error(path, "no such image file or folder")
    by_stem: dict[str, Path] = {}
    for path in files if unique_stems else ():
        other = by_stem.setdefault(path.stem, path)
        if other != path:
            raise error(path, f"has the same name stem as {other}; both would be written to "
                              f"{path.stem}.png")
    return files


def png_bit_depth(path: str | Path) -> int | None:
    """Bits per sample of a PNG file (from its ``IHDR``), None for any other file. The
    runtimes refuse 16-bit colour PNGs: Pillow would silently cut them to 8 bits."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def mask_pixels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """A uint8 label map as PNG pixels: 0 / 255 for ``num_classes == 1``, else the labels."""
    mask = np.asarray(mask, dtype=np.uint8)
    return mask * np.uint8(255) if num_classes == 1 else mask.copy()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(pixels: np.ndarray) -> bytes:
    """The PNG file of a uint8 HW (grey) or HW3 (RGB) array."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3
                                                            and pixels.shape[-1] == 3)):
        raise ValueError(f"PNG pixels must be uint8 H x W or H x W x 3; got {pixels.dtype} "
                         f"{pixels.shape}")
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"PNG needs at least one pixel; got {height}x{width}")
    colour_type = 0 if pixels.ndim == 2 else 2
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace``;
    on any failure the temporary file is removed and the target left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder``."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` (see :func:`encode_png`) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    data = encode_png(pixels)
    try:
        return atomic_write_bytes(path, data)
    except OSError as err:  # name the file the user asked for, not the temporary one
        raise OSError(err.errno, f"cannot write it ({err.strerror or err})", str(path)) from err


def make_folder(folder: str | Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    folder = Path(folder)
    made, current = [], folder
    while not current.exists() and current != current.parent:
        made.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_made_folders(made: Sequence[Path]) -> None:
    """Remove the folders :func:`make_folder` created, deepest first, while they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break
