"""NumPy preprocessing: augmentation alignment and determinism, tiling round trip, resizing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hidiff.data.transforms import (
    apply_geometry,
    augment,
    mask_to_channels,
    normalize,
    random_crop,
    resize_pair,
    sample_augment_params,
)
from hidiff.data.transforms import denormalize as denorm
from reference.images import extract_tiles, stitch_tiles, tile_starts


def _marked_pair(h=20, w=28):
    """Image channel 0 carries the mask (1 where foreground); the mask is asymmetric."""
    mask = np.zeros((h, w), np.uint8)
    mask[2:12, 3:6] = 1
    mask[9:12, 3:15] = 1
    mask[0, w - 1] = 1  # a lone corner marker
    image = np.random.default_rng(0).random((h, w, 3)).astype(np.float32) * 0.3 + 0.1
    image[..., 0] = mask
    return image, mask


def test_augment_keeps_masks_binary_and_aligned():
    image, mask = _marked_pair()
    seen = set()
    for seed in range(40):
        aug_image, aug_mask = augment(image, mask, np.random.default_rng(seed))
        params = sample_augment_params(np.random.default_rng(seed))
        seen.add((params.hflip, params.vflip, params.rot90))
        assert aug_mask.dtype == np.uint8 and set(np.unique(aug_mask).tolist()) == {0, 1}
        assert aug_mask.sum() == mask.sum()
        # the mask got exactly the geometry the image got ...
        np.testing.assert_array_equal(aug_mask, apply_geometry(mask, params))
        # ... and the image's marker channel still sits on the mask (brightness/contrast are
        # monotone, so foreground stays brighter than background)
        channel = aug_image[..., 0]
        assert channel[aug_mask == 1].min() > channel[aug_mask == 0].max()
        assert aug_image.dtype == np.float32 and 0 <= aug_image.min() and aug_image.max() <= 1
        if params.rot90 % 2:
            assert aug_image.shape[:2] == (mask.shape[1], mask.shape[0])
    assert len(seen) >= 6  # flips and turns vary


def test_augment_is_deterministic():
    image, mask = _marked_pair()
    a = augment(image, mask, np.random.default_rng(7))
    b = augment(image, mask, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = [augment(image, mask, np.random.default_rng(s))[0] for s in range(8, 12)]
    assert any(not np.array_equal(a[0], x) for x in c)


def test_augment_can_be_switched_off():
    image, mask = _marked_pair()
    out_image, out_mask = augment(image, mask, np.random.default_rng(1), flips=False,
                                  rotate=False, brightness=0.0, contrast=0.0)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), tile=st.integers(8, 40),
       overlap_frac=st.floats(0.0, 0.9))
def test_tile_stitch_round_trip(h, w, tile, overlap_frac):
    overlap = min(int(overlap_frac * tile), tile - 1)
    image = np.random.default_rng(h * 100 + w).random((h, w, 3)).astype(np.float32)
    tiles, starts = extract_tiles(image, tile, overlap)
    assert tiles.shape[1:] == (tile, tile, 3)
    np.testing.assert_array_equal(stitch_tiles(tiles, starts, (h, w)), image)
    chw = np.moveaxis(tiles, -1, 1)
    np.testing.assert_array_equal(stitch_tiles(chw, starts, (h, w), channels_first=True),
                                  np.moveaxis(image, -1, 0))


def test_tile_starts():
    assert tile_starts(999, 256, 64) == [0, 192, 384, 576, 743]
    assert tile_starts(256, 256, 64) == [0]
    assert tile_starts(100, 256, 64) == [0]
    for length in (257, 300, 960, 999):
        starts = tile_starts(length, 256, 64)
        assert starts[-1] == length - 256
        assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError):
        tile_starts(100, 32, 32)


def test_stitch_averages_overlaps():
    tiles, starts = extract_tiles(np.zeros((10, 14)), 8, 4)
    values = np.arange(1, len(tiles) + 1, dtype=np.float32)[:, None, None] * np.ones_like(tiles)
    out = stitch_tiles(values, starts, (10, 14))
    assert out[0, 0] == 1.0 and out[-1, -1] == len(tiles)
    assert out.min() >= 1.0 and out.max() <= len(tiles)


def test_resize_pair_and_channels():
    image, mask = _marked_pair(37, 53)
    small_image, small_mask = resize_pair(image, mask, 16)
    assert small_image.shape == (16, 16, 3) and small_image.dtype == np.float32
    assert small_mask.shape == (16, 16) and set(np.unique(small_mask).tolist()) <= {0, 1}
    wide_image, wide_mask = resize_pair(image, mask, (40, 60))
    assert wide_image.shape == (40, 60, 3) and wide_mask.shape == (40, 60)
    same_image, same_mask = resize_pair(image, mask, (37, 53))
    np.testing.assert_array_equal(same_image, image)
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    onehot = mask_to_channels(labels, 3)
    assert onehot.shape == (3, 2, 2) and np.all(onehot.sum(0) == 1)
    assert mask_to_channels(labels == 1, 1).shape == (1, 2, 2)


def test_normalize_and_crop():
    image, mask = _marked_pair()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = normalize(image, mean, std)
    assert normed.dtype == np.float32
    np.testing.assert_allclose(denorm(normed, mean, std), image, atol=1e-6)
    crop_image, crop_mask = random_crop(image, mask, 8, np.random.default_rng(0))
    assert crop_image.shape == (8, 8, 3) and crop_mask.shape == (8, 8)
    np.testing.assert_array_equal(crop_image[..., 0], crop_mask)  # still aligned
    big_image, big_mask = random_crop(image, mask, 32, np.random.default_rng(0))
    assert big_image.shape == (32, 32, 3) and big_mask[20:].sum() == 0  # zero-padded
