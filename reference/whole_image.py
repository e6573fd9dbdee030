"""Whole images in, masks out: the preprocessing policy around :func:`reference.predict_batch`.

    prep = Preprocessing(policy="resize", mean=m, std=s, input_size=(128, 128))
    pred = predict_image(image, preprocessing=prep, segment=seg_fn, denoise=den_fn,
                         sampler=sampler, seed=0)
    pred.mask, pred.prob, pred.prior, pred.spread       # at the image's own size

The torch pipeline and the edge runtime both call this with their network callables, so an
image is preprocessed, sampled and put back together in one place:

- ``resize``: the image is resized (bilinear, :func:`reference.images.resize_planes`) to
  ``input_size``, normalised and predicted as a batch of one; the mask is taken at the model's
  size and resized back by nearest neighbour, ``prob`` / ``prior`` / ``spread`` bilinearly (for
  display: the mask is not re-thresholded from them).
- ``tile``: the normalised image is cut into ``tile`` x ``tile`` tiles overlapping by ``overlap``
  pixels (:func:`reference.images.extract_tiles`; zero-padded bottom / right when smaller than a
  tile, so the padding is 0 in the normalised space), all tiles form one batch for the uniforms
  (row-major order), the networks run ``tile_batch`` tiles at a time, the maps are averaged where
  tiles overlap and the mask is taken from the stitched mean.

An image's result depends only on the image, the sampler and the seed (one image per call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .images import extract_tiles, normalize, resize_labels, resize_planes, stitch_tiles
from .inference import DEFAULT_TILE_BATCH, Sampler, predict_batch
from .sampling import final_labels

__all__ = ["POLICIES", "ImagePrediction", "Preprocessing", "network_inputs", "predict_image"]

#: how a whole image reaches the network: resized to the model's size, or tiled at native size
POLICIES = ("resize", "tile")


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing facts of a model: ``policy`` (one of :data:`POLICIES`), per-channel
    ``mean`` / ``std`` of the normalisation, ``input_size`` (H, W) for ``resize``, ``tile`` and
    ``overlap`` for ``tile``."""

    policy: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None = None
    tile: int = 0
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise ValueError(f"mean and std need one value per channel, std > 0; got "
                             f"{self.mean}, {self.std}")
        if self.policy == "resize" and (self.input_size is None
                                        or min(self.input_size) < 1):
            raise ValueError(f"the resize policy needs input_size (H, W); got {self.input_size}")
        if self.policy == "tile" and not (self.tile >= 1 and 0 <= self.overlap < self.tile):
            raise ValueError(f"the tile policy needs tile >= 1 and 0 <= overlap < tile; got "
                             f"tile={self.tile}, overlap={self.overlap}")


@dataclass(frozen=True)
class ImagePrediction:
    """One image's result at its own size: ``mask`` (H, W) uint8 label map (0/1 for K = 1,
    argmax for K > 1); ``prob`` (K, H, W) float32 mean of the chains' estimates (the prior
    for the segmentor alone); ``prior`` (K, H, W) float32; ``spread`` (K, H, W) float32
    standard deviation of the estimates across the chains (the uncertainty map)."""

    mask: np.ndarray
    prob: np.ndarray
    prior: np.ndarray
    spread: np.ndarray


def _chw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(hwc, -1, -3), dtype=np.float32)


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    hwc = np.moveaxis(np.asarray(maps, dtype=np.float32), 0, -1)
    return _chw(resize_planes(hwc, height, width))


def _check_image(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != len(prep.mean):
        raise ValueError(f"image must be H x W x {len(prep.mean)}; got shape {image.shape}")
    return image


def network_inputs(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """What the networks see of one HWC float image in [0, 1]: ``(N, C, h, w)`` float32, the
    resized normalised image (``resize``, N = 1) or its normalised tiles (``tile``, row-major)."""
    prep = preprocessing
    image = _check_image(image, prep)
    if prep.policy == "resize":
        h, w = prep.input_size
        return _chw(normalize(resize_planes(image, h, w), prep.mean, prep.std))[None]
    tiles, _ = extract_tiles(normalize(image, prep.mean, prep.std), prep.tile, prep.overlap)
    return _chw(tiles)


def predict_image(
    image: np.ndarray,
    *,
    preprocessing: Preprocessing,
    segment: Callable[[np.ndarray], tuple[np.ndarray, Any]],
    denoise: Callable[[Any, np.ndarray, int], np.ndarray] | None,
    sampler: Sampler | None,
    seed: int = 0,
    tile_batch: int = DEFAULT_TILE_BATCH,
) -> ImagePrediction:
    """Predict one HWC float image in [0, 1] at its own size (module docstring); ``segment``,
    ``denoise`` and ``sampler`` as in :func:`reference.predict_batch` (None: the segmentor
    alone)."""
    prep = preprocessing
    image = _check_image(image, prep)
    height, width = image.shape[:2]
    run = dict(segment=segment, denoise=denoise, sampler=sampler, seed=seed)
    if prep.policy == "resize":
        out = predict_batch(network_inputs(image, prep), **run)
        return ImagePrediction(resize_labels(final_labels(out.prob)[0], height, width),
                               *(_resize_maps(a[0], height, width)
                                 for a in (out.prob, out.prior, out.spread)))
    starts = extract_tiles(np.zeros((height, width, 1), np.float32), prep.tile, prep.overlap)[1]
    out = predict_batch(network_inputs(image, prep), batch_size=tile_batch, **run)
    prob, prior, spread = (stitch_tiles(a, starts, (height, width), channels_first=True)
                           for a in (out.prob, out.prior, out.spread))
    return ImagePrediction(final_labels(prob[None])[0], prob.astype(np.float32),
                           prior.astype(np.float32), spread.astype(np.float32))
