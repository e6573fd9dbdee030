"""The shared inference preprocessing and file output (reference.images / files / overlay)
against Pillow, the library the models were trained with, and against their own contracts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reference import files, images
from reference.overlay import CLASS_COLOURS, GT_COLOUR, contour, overlay

# Pillow runs the two passes of a 2-D bilinear resize in an order of its own choosing (each pass
# alone is bit-identical, test below); the other order rounds the float32 intermediate
# differently, by at most a few float32 ulps of values in [0, 1].
RESIZE_2D_ATOL = 4 * np.finfo(np.float32).eps

sizes = st.integers(1, 40)


def _pil_bilinear(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize(
        (width, height), Image.Resampling.BILINEAR))


def _planes(h: int, w: int, seed: int, zeros: bool) -> np.ndarray:
    planes = np.random.default_rng(seed).random((h, w, 2), dtype=np.float32)
    if zeros:
        planes[::2] = 0.0  # exact zeros, and edges between zero and non-zero rows
    return planes


@settings(max_examples=60, deadline=None)
@given(h=sizes, w=sizes, n=st.integers(1, 60), seed=st.integers(0, 99), zeros=st.booleans())
def test_each_bilinear_pass_equals_pillow_bit_for_bit(h, w, n, seed, zeros):
    planes = _planes(h, w, seed, zeros)
    for c in range(2):
        horizontal = images.resize_planes(planes[..., c], h, n)
        vertical = images.resize_planes(planes[..., c], n, w)
        assert np.array_equal(horizontal, _pil_bilinear(planes[..., c], h, n))
        assert np.array_equal(vertical, _pil_bilinear(planes[..., c], n, w))


@settings(max_examples=60, deadline=None)
@given(h=sizes, w=sizes, oh=st.integers(1, 60), ow=st.integers(1, 60), seed=st.integers(0, 99),
       zeros=st.booleans())
def test_2d_bilinear_resize_matches_pillow(h, w, oh, ow, seed, zeros):
    planes = _planes(h, w, seed, zeros)
    out = images.resize_planes(planes, oh, ow)
    assert out.shape == (oh, ow, 2) and out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[..., c], _pil_bilinear(planes[..., c], oh, ow),
                                   rtol=0, atol=RESIZE_2D_ATOL)


def test_resize_keeps_constants_and_copies_same_size():
    flat = np.full((7, 9, 3), 0.25, np.float32)
    assert np.array_equal(images.resize_planes(flat, 20, 3), np.full((20, 3, 3), 0.25))
    same = images.resize_planes(flat, 7, 9)
    assert np.array_equal(same, flat) and same is not flat
    with pytest.raises(ValueError, match="positive"):
        images.resize_planes(flat, 0, 3)


@settings(max_examples=60, deadline=None)
@given(h=sizes, w=sizes, oh=st.integers(1, 70), ow=st.integers(1, 70), seed=st.integers(0, 99))
def test_nearest_label_resize_equals_pillow(h, w, oh, ow, seed):
    labels = np.random.default_rng(seed).integers(0, 4, (h, w)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(labels).resize((ow, oh), Image.Resampling.NEAREST))
    assert np.array_equal(images.resize_labels(labels, oh, ow), expected)


def test_normalize_is_float32_per_channel():
    out = images.normalize(np.ones((2, 2, 3), np.float32), (0.5, 0.0, 1.0), (0.5, 2.0, 1.0))
    assert out.dtype == np.float32 and out[0, 0].tolist() == [1.0, 0.5, 0.0]


def test_png_round_trips_through_pillow(tmp_path):
    rng = np.random.default_rng(0)
    for pixels in (rng.integers(0, 256, (5, 7), dtype=np.uint8),
                   rng.integers(0, 256, (3, 1, 3), dtype=np.uint8),
                   np.zeros((1, 1), np.uint8)):
        path = files.write_png(tmp_path / "m.png", pixels)
        with Image.open(path) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im), pixels)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary file left
    for bad in (np.zeros((2, 2), np.float32), np.zeros((2, 2, 4), np.uint8),
                np.zeros((0, 3), np.uint8)):
        with pytest.raises(ValueError, match="PNG"):
            files.encode_png(bad)


def test_mask_pixels():
    mask = np.array([[0, 1], [1, 0]], np.uint8)
    assert files.mask_pixels(mask, 1).tolist() == [[0, 255], [255, 0]]
    assert files.mask_pixels(mask * 2, 3).tolist() == [[0, 2], [2, 0]]


def test_collect_images_expands_folders_in_natural_order_and_names_problems(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("img10.png", "img2.JPG", ".hidden.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.tif"
    single.write_bytes(b"x")
    got = files.collect_images([folder, single])
    assert [p.name for p in got] == ["img2.JPG", "img10.png", "single.tif"]

    class Problem(Exception):
        def __init__(self, path, message):
            super().__init__(f"{path}: {message}")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Problem, match="empty: no image files"):
        files.collect_images([empty], error=Problem)
    with pytest.raises(ValueError, match="missing.png: no such image file or folder"):
        files.collect_images([tmp_path / "missing.png"])
    (tmp_path / "img2.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="same name stem"):
        files.collect_images([folder, tmp_path / "img2.png"])
    with pytest.raises(ValueError, match="no input images"):
        files.collect_images([])


def test_overlay_fills_outlines_and_marks_the_ground_truth():
    rgb = np.full((12, 12, 3), 100, np.uint8)
    mask = np.zeros((12, 12), np.uint8)
    mask[2:9, 2:9] = 1
    mask[10:, 10:] = 2
    gt = np.zeros_like(mask)
    gt[4:7, 4:7] = 1
    out = overlay(rgb, mask, gt, thickness=1)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    inside = (0.6 * 100 + 0.4 * np.asarray(CLASS_COLOURS[0], np.float32)).astype(np.uint8)
    assert out[5, 3].tolist() == inside.tolist()  # filled, not on a contour
    assert out[2, 5].tolist() == list(CLASS_COLOURS[0])  # class 1 contour
    assert out[11, 11].tolist() == list(CLASS_COLOURS[1])  # class 2 contour
    assert out[4, 5].tolist() == list(GT_COLOUR)  # ground-truth contour drawn last
    assert out[0, 0].tolist() == [100, 100, 100]
    assert np.array_equal(overlay(rgb, None), rgb)
    ring = contour(mask == 1, thickness=1)
    assert ring[2, 2] and not ring[5, 5] and ring.sum() == 24
    with pytest.raises(ValueError, match="shape"):
        overlay(rgb, mask[:5])


def test_network_inputs_are_what_predict_image_feeds_the_segmentor():
    """``network_inputs`` (used to calibrate the int8 segmentor) is exactly the batch
    ``predict_image`` gives the segmentor, for both policies."""
    import reference

    rng = np.random.default_rng(0)
    image = rng.random((50, 70, 3), dtype=np.float32)
    image[:5] = 0.0  # exact zeros
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for prep in (reference.Preprocessing(policy="resize", mean=mean, std=std,
                                         input_size=(32, 48)),
                 reference.Preprocessing(policy="tile", mean=mean, std=std, tile=32,
                                         overlap=8)):
        seen = []

        def segment(x, seen=seen):
            seen.append(x.copy())
            return np.full((x.shape[0], 1, *x.shape[2:]), 0.5, np.float32), None

        reference.predict_image(image, preprocessing=prep, segment=segment, denoise=None,
                                sampler=None, tile_batch=100)
        x = reference.network_inputs(image, prep)
        assert x.dtype == np.float32 and x.shape[1] == 3
        np.testing.assert_array_equal(np.concatenate(seen), x)
        # and what that batch is, from the primitives: resize then normalise / normalise then tile
        if prep.policy == "resize":
            want = images.normalize(images.resize_planes(image, 32, 48), mean, std)[None]
        else:
            want = images.extract_tiles(images.normalize(image, mean, std), 32, 8)[0]
            assert want.shape[0] == 6  # 50 x 70 in 32 px tiles overlapping by 8: 2 x 3
        np.testing.assert_array_equal(x, np.ascontiguousarray(want.transpose(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="image must be H x W x 3"):
        reference.network_inputs(image[..., :2], prep)
