"""NumPy preprocessing: resizing, normalisation, training augmentation, crops, mask channels.

Images are float32 HWC in [0, 1], masks uint8 HW label maps, as :mod:`hidiff.data.io` returns
them. Geometric transforms act on image and mask alike (masks stay label maps, aligned with the
image); photometric ones on the image only. All randomness comes from a caller's
``numpy.random.Generator``, drawn in a fixed order, so one generator state gives one result.
Inference preprocessing (the bilinear resize of float planes without Pillow, ``normalize``, tiles
and stitching) is :mod:`reference.images`, shared with the edge runtime; ``normalize`` is that
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reference.images import normalize

__all__ = [
    "AugmentParams", "apply_augment", "apply_geometry", "augment", "denormalize",
    "mask_to_channels", "normalize", "pad_to", "random_crop", "resize_image", "resize_mask",
    "resize_pair", "sample_augment_params", "to_chw",
]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
             "bicubic": Image.Resampling.BICUBIC}


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = (int(s) for s in size)
    return height, width


def resize_image(image: np.ndarray, size: int | Sequence[int], *,
                 resample: str = "bilinear") -> np.ndarray:
    """Resize an HW or HWC float array to ``size`` (int: square; else ``(H, W)``) per channel.

    Runs PIL on float32 ("F" mode), so no 8-bit rounding; also for probability maps.
    """
    height, width = _size_hw(size)
    image = np.asarray(image, dtype=np.float32)
    if image.shape[:2] == (height, width):
        return image.copy()
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c]))
                   .resize((width, height), _RESAMPLE[resample]))
        for c in range(planes.shape[-1])
    ], axis=-1)
    return out[..., 0] if image.ndim == 2 else out


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 label map (labels stay labels)."""
    height, width = _size_hw(size)
    mask = np.asarray(mask, dtype=np.uint8)
    if mask.shape == (height, width):
        return mask.copy()
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int | Sequence[int],
                ) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, mask nearest, both to ``size``."""
    return resize_image(image, size), resize_mask(mask, size)


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`normalize`."""
    return (np.asarray(image, dtype=np.float32) * np.asarray(std, dtype=np.float32)
            + np.asarray(mean, dtype=np.float32)).astype(np.float32)


def to_chw(image: np.ndarray) -> np.ndarray:
    """HWC -> contiguous CHW."""
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


def mask_to_channels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map HW -> float32 ``(K, H, W)``: K = 1 binary (mask itself), else one-hot."""
    mask = np.asarray(mask)
    if num_classes == 1:
        return (mask == 1).astype(np.float32)[None]
    return (mask[None] == np.arange(num_classes).reshape(-1, 1, 1)).astype(np.float32)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the training augmentation.

    Geometry (image and mask): left-right flip, up-down flip, then ``rot90`` quarter turns
    counter-clockwise (``np.rot90`` on the two spatial axes). Photometry (image only):
    ``clip((x - m) * contrast + m + brightness, 0, 1)`` with ``m`` the image mean.
    """

    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    brightness: float = 0.0
    contrast: float = 1.0


def sample_augment_params(rng: np.random.Generator, *, flips: bool = True, rotate: bool = True,
                          brightness: float = 0.1, contrast: float = 0.1) -> AugmentParams:
    """Draw parameters; always five draws in the same order, whatever is switched off."""
    hflip, vflip = rng.random() < 0.5, rng.random() < 0.5
    quarter = int(rng.integers(4))
    delta = float(rng.uniform(-brightness, brightness))
    factor = float(rng.uniform(1.0 - contrast, 1.0 + contrast))
    return AugmentParams(hflip=bool(hflip and flips), vflip=bool(vflip and flips),
                         rot90=quarter if rotate else 0, brightness=delta, contrast=factor)


def apply_geometry(array: np.ndarray, params: AugmentParams) -> np.ndarray:
    """The geometric part of ``params`` on an HW or HWC array (contiguous copy)."""
    if params.hflip:
        array = array[:, ::-1]
    if params.vflip:
        array = array[::-1]
    if params.rot90:
        array = np.rot90(array, params.rot90, axes=(0, 1))
    return np.ascontiguousarray(array)


def apply_augment(image: np.ndarray, mask: np.ndarray, params: AugmentParams,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Apply one augmentation draw: geometry to both, photometry to the image."""
    image = apply_geometry(image, params)
    mask = apply_geometry(mask, params)
    if params.brightness != 0.0 or params.contrast != 1.0:
        centre = np.float32(image.mean())
        image = np.clip((image - centre) * np.float32(params.contrast) + centre
                        + np.float32(params.brightness), 0.0, 1.0).astype(np.float32)
    return image, mask


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *,
            flips: bool = True, rotate: bool = True, brightness: float = 0.1,
            contrast: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Training-only augmentation: random flips, 90-degree turns, brightness/contrast jitter.

    Deterministic for a given generator state. A non-square input may come back transposed
    (odd quarter turns); masks keep their label values and stay aligned with the image.
    """
    params = sample_augment_params(rng, flips=flips, rotate=rotate, brightness=brightness,
                                   contrast=contrast)
    return apply_augment(image, mask, params)


def pad_to(image: np.ndarray, mask: np.ndarray, size: int | Sequence[int],
           ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad image and mask at the bottom/right to at least ``size``."""
    height, width = _size_hw(size)
    extra_h, extra_w = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if not (extra_h or extra_w):
        return image, mask
    pad = ((0, extra_h), (0, extra_w))
    return np.pad(image, pad + ((0, 0),) * (image.ndim - 2)), np.pad(mask, pad)


def random_crop(image: np.ndarray, mask: np.ndarray, size: int | Sequence[int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly placed ``size`` crop of image and mask (padded first if smaller).

    Two draws from ``rng`` (row, then column offset).
    """
    height, width = _size_hw(size)
    image, mask = pad_to(image, mask, (height, width))
    top = int(rng.integers(image.shape[0] - height + 1))
    left = int(rng.integers(image.shape[1] - width + 1))
    return (np.ascontiguousarray(image[top:top + height, left:left + width]),
            np.ascontiguousarray(mask[top:top + height, left:left + width]))
