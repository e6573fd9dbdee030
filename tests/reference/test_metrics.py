"""Tests of reference.metrics: analytic cases, an independent scipy.ndimage oracle, empty rules."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.ndimage as ndi  # noqa: E402  (dev dependency: the independent oracle)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import metrics
from reference.metrics import (
    accuracy,
    case_metrics,
    dice,
    directed_surface_distances,
    hd95,
    iou,
    multiclass,
    recall,
    summarize,
    surface,
)

CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
OVERLAP = (dice, iou, recall, accuracy)


# --------------------------------------------------------------------------- strategies


@st.composite
def shapes(draw, max_side: int = 64) -> tuple[int, int]:
    return draw(st.integers(1, max_side)), draw(st.integers(1, max_side))


@st.composite
def masks(draw, shape: tuple[int, int], nonempty: bool = False) -> np.ndarray:
    """Union of 1-2 components, each a few rectangles, a few discs or random noise."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros(shape, dtype=bool)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["rects", "discs", "noise", "empty"]))
        if kind == "rects":
            for _ in range(draw(st.integers(1, 4))):
                y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
                y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
                out[y0:y1, x0:x1] = True
        elif kind == "discs":
            for _ in range(draw(st.integers(1, 3))):
                cy, cx = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
                r = draw(st.floats(0.0, max(h, w) / 2))
                out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif kind == "noise":
            out |= draw(hnp.arrays(np.bool_, shape))
    if nonempty and not out.any():
        out[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    return out


@st.composite
def mask_pairs(draw, nonempty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(shapes())
    return draw(masks(shape, nonempty)), draw(masks(shape, nonempty))


spacings = st.one_of(st.none(), st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)))


# --------------------------------------------------------------------------- independent oracle


def scipy_surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndi.binary_erosion(m, structure=CROSS, border_value=0)


def scipy_directed(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    sp = (1.0, 1.0) if spacing is None else spacing
    sa, sb = scipy_surface(a), scipy_surface(b)
    d_ab = ndi.distance_transform_edt(~sb, sampling=sp)[sa]
    d_ba = ndi.distance_transform_edt(~sa, sampling=sp)[sb]
    return d_ab, d_ba


def scipy_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    return float(np.percentile(np.concatenate(scipy_directed(a, b, spacing)), 95))


def square(shape, y0, x0, side) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def disc(shape, center, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


# --------------------------------------------------------------------------- analytic cases


def test_two_overlapping_squares_exact():
    a = square((20, 20), 0, 0, 10)  # |A| = 100
    b = square((20, 20), 5, 5, 10)  # |B| = 100, |A ∩ B| = 25, |A ∪ B| = 175
    assert dice(a, b) == 2 * 25 / 200
    assert iou(a, b) == 25 / 175
    assert recall(a, b) == 25 / 100
    assert accuracy(a, b) == (25 + 400 - 175) / 400


@settings(max_examples=100, deadline=None)
@given(shape=shapes(), data=st.data(), spacing=spacings)
def test_identical_masks(shape, data, spacing):
    m = data.draw(masks(shape, nonempty=True))
    assert dice(m, m) == 1.0
    assert iou(m, m) == 1.0
    assert recall(m, m) == 1.0
    assert accuracy(m, m) == 1.0
    assert hd95(m, m, spacing=spacing) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("axis", [0, 1])
def test_shifted_square_hd95_is_shift(k, axis):
    # Square side s = 10 shifted by k along one axis (k <= s - 1 - k). Hand count, per direction
    # (36 surface pixels): on the two edges across the shift, k pixels lie outside the other
    # square at 1..k and the rest at 0; the trailing edge's 8 interior pixels are at exactly k;
    # the leading edge's interior pixels are at min(k, i, 9 - i) <= k. So the largest distance is
    # k, held by >= 20 of the 72 symmetric distances, and the 95th percentile (position 67.45 of
    # 0..71) is k. With spacing (dy, dx) the same count gives k * (spacing along the shift).
    a = square((30, 30), 8, 8, 10)
    b = np.roll(a, k, axis=axis)
    assert hd95(a, b) == k
    spacing = (0.7, 2.3)
    assert hd95(a, b, spacing=spacing) == pytest.approx(k * spacing[axis], rel=1e-12)


def test_hd95_percentile_interpolates():
    # A = {(0, 0)}, B = {(0, 3), (0, 4)}: d(A->B) = [3], d(B->A) = [3, 4];
    # percentile_95 of [3, 3, 4] sits at position 0.95 * 2 = 1.9 -> 3 + 0.9 * (4 - 3) = 3.9.
    a = np.zeros((1, 6), dtype=bool)
    b = np.zeros((1, 6), dtype=bool)
    a[0, 0] = True
    b[0, 3:5] = True
    assert hd95(a, b) == pytest.approx(3.9, abs=1e-12)
    d_ab, d_ba = directed_surface_distances(a, b)
    np.testing.assert_array_equal(d_ab, [3.0])
    np.testing.assert_array_equal(d_ba, [3.0, 4.0])


@pytest.mark.parametrize(("r1", "r2"), [(5, 8), (10, 20), (12.5, 30), (3, 45)])
def test_concentric_discs(r1, r2):
    shape, c = (101, 101), (50, 50)
    value = hd95(disc(shape, c, r1), disc(shape, c, r2))
    assert abs(value - (r2 - r1)) <= 1.0


def test_hd95_large_blob_under_one_second():
    yy, xx = np.mgrid[:1000, :1000]
    a = (yy - 500) ** 2 + (xx - 500) ** 2 < 420**2
    b = ((yy - 520) ** 2) / 1.3 + (xx - 470) ** 2 < 390**2
    hd95(a, b)  # warm-up
    start = time.perf_counter()
    value = hd95(a, b)
    elapsed = time.perf_counter() - start
    assert value == pytest.approx(scipy_hd95(a, b, None), abs=1e-9)
    assert elapsed < 1.0, f"hd95 on 1000x1000 took {elapsed:.3f} s"


# --------------------------------------------------------------------------- scipy agreement


@settings(max_examples=300, deadline=None)
@given(pair=mask_pairs(nonempty=True), spacing=spacings)
def test_agrees_with_scipy(pair, spacing):
    a, b = pair
    np.testing.assert_array_equal(surface(a), scipy_surface(a))
    d_ab, d_ba = directed_surface_distances(a, b, spacing=spacing)
    r_ab, r_ba = scipy_directed(a, b, spacing)
    np.testing.assert_allclose(d_ab, r_ab, rtol=0, atol=1e-9)
    np.testing.assert_allclose(d_ba, r_ba, rtol=0, atol=1e-9)
    assert abs(hd95(a, b, spacing=spacing) - scipy_hd95(a, b, spacing)) <= 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_and_chunked_search_agree_with_scipy(monkeypatch, seed):
    # Force the exhaustive phase (no local window) with tiny chunks, on larger masks.
    monkeypatch.setattr(metrics, "_WINDOW", 0)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 97)
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(50, 200)), int(rng.integers(50, 200)))
    a = rng.random(shape) < rng.uniform(0.001, 0.3)
    b = disc(shape, (shape[0] // 3, shape[1] // 2), 20) | (rng.random(shape) < 0.002)
    a[0, 0] = True
    spacing = (float(rng.uniform(0.2, 5)), float(rng.uniform(0.2, 5)))
    for sp in (None, spacing):
        d_ab, d_ba = directed_surface_distances(a, b, spacing=sp)
        r_ab, r_ba = scipy_directed(a, b, sp)
        np.testing.assert_allclose(d_ab, r_ab, rtol=0, atol=1e-9)
        np.testing.assert_allclose(d_ba, r_ba, rtol=0, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(pair=mask_pairs())
def test_overlap_metrics_match_counts(pair):
    a, b = pair
    tp = np.sum(a & b)
    fp = np.sum(a & ~b)
    fn = np.sum(~a & b)
    tn = np.sum(~a & ~b)
    if tp + fp + fn:
        assert dice(a, b) == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-15)
        assert iou(a, b) == pytest.approx(tp / (tp + fp + fn), rel=1e-15)
    if tp + fn:
        assert recall(a, b) == pytest.approx(tp / (tp + fn), rel=1e-15)
    assert accuracy(a, b) == pytest.approx((tp + tn) / a.size, rel=1e-15)


# --------------------------------------------------------------------------- algebraic properties


@settings(max_examples=200, deadline=None)
@given(pair=mask_pairs(), spacing=spacings)
def test_relation_symmetry_bounds(pair, spacing):
    a, b = pair
    d, j = dice(a, b), iou(a, b)
    if a.any() or b.any():
        assert j == pytest.approx(d / (2 - d), abs=1e-12)
        assert 0.0 <= d <= 1.0 and 0.0 <= j <= 1.0
    assert 0.0 <= accuracy(a, b) <= 1.0
    r = recall(a, b)
    assert math.isnan(r) or 0.0 <= r <= 1.0
    for f in (dice, iou, accuracy):
        np.testing.assert_equal(f(a, b), f(b, a))
    np.testing.assert_equal(hd95(a, b, spacing=spacing), hd95(b, a, spacing=spacing))
    h = hd95(a, b, spacing=spacing)
    assert math.isnan(h) or h >= 0.0


@settings(max_examples=100, deadline=None)
@given(pair=mask_pairs(), spacing=spacings)
def test_inputs_not_mutated_and_int_inputs(pair, spacing):
    a, b = pair
    ai, bi = a.astype(np.uint8), b.astype(np.int64)
    arrays = (a, b, ai, bi)
    copies = [x.copy() for x in arrays]
    for x in arrays:
        x.setflags(write=False)
    expected = case_metrics(a, b, spacing=spacing)
    np.testing.assert_equal(case_metrics(ai, bi, spacing=spacing), expected)
    np.testing.assert_equal(case_metrics(a, bi, spacing=spacing), expected)
    surface(ai)
    if a.any() and b.any():
        directed_surface_distances(ai, b, spacing=spacing)
    multiclass(ai, bi, classes=[1])
    for x, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(x, c)
        assert x.dtype == c.dtype


# --------------------------------------------------------------------------- empty-mask rules


def _pair_with(pred_empty: bool, gt_empty: bool) -> tuple[np.ndarray, np.ndarray]:
    full = square((8, 8), 2, 2, 3)
    empty = np.zeros((8, 8), dtype=bool)
    return (empty if pred_empty else full), (empty if gt_empty else full.T[::-1])


def test_both_empty():
    a, b = _pair_with(True, True)
    assert math.isnan(dice(a, b))
    assert math.isnan(iou(a, b))
    assert math.isnan(recall(a, b))
    assert accuracy(a, b) == 1.0
    assert math.isnan(hd95(a, b))
    assert math.isnan(hd95(a, b, spacing=(2.0, 3.0)))


@pytest.mark.parametrize("pred_empty", [True, False])
def test_exactly_one_empty(pred_empty):
    a, b = _pair_with(pred_empty, not pred_empty)
    assert dice(a, b) == 0.0
    assert iou(a, b) == 0.0
    assert hd95(a, b) == math.inf
    assert hd95(a, b, spacing=(0.5, 0.5)) == math.inf
    assert accuracy(a, b) == (64 - 9) / 64
    if pred_empty:
        assert recall(a, b) == 0.0  # gt non-empty: defined, nothing found
    else:
        assert math.isnan(recall(a, b))  # gt empty: recall undefined
    with pytest.raises(ValueError, match="non-empty"):
        directed_surface_distances(a, b)


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("func", [*OVERLAP, hd95, case_metrics, multiclass])
def test_shape_mismatch_names_both_shapes(func):
    a = np.zeros((4, 5), dtype=bool)
    b = np.zeros((5, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        func(a, b)


@pytest.mark.parametrize("func", [*OVERLAP, hd95])
def test_bad_inputs(func):
    ok = np.zeros((3, 3), dtype=bool)
    with pytest.raises(TypeError, match="threshold"):
        func(np.zeros((3, 3), dtype=np.float32), ok)
    with pytest.raises(ValueError, match="0 and 1"):
        func(np.full((3, 3), 2), ok)
    with pytest.raises(ValueError, match="2-D"):
        func(np.zeros((1, 3, 3), dtype=bool), np.zeros((1, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        func(np.zeros((0, 3), dtype=bool), np.zeros((0, 3), dtype=bool))


@pytest.mark.parametrize("spacing", [(1.0,), (1.0, 0.0), (1.0, -2.0), (1.0, math.inf), (1, 2, 3)])
def test_bad_spacing(spacing):
    m = square((6, 6), 1, 1, 3)
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, spacing=spacing)


# --------------------------------------------------------------------------- aggregation


def test_summarize_counts_and_finite_statistics():
    cases = [
        {"dice": 0.5, "hd95": 2.0},
        {"dice": 1.0, "hd95": math.inf},
        {"dice": math.nan, "hd95": math.nan},
        {"dice": 0.75, "hd95": 4.0},
    ]
    s = summarize(cases)
    assert list(s) == ["dice", "hd95"]
    assert s["dice"]["mean"] == pytest.approx(0.75)
    assert s["dice"]["median"] == pytest.approx(0.75)
    assert s["dice"]["std"] == pytest.approx(np.std([0.5, 1.0, 0.75]))
    d = s["dice"]
    assert (d["n"], d["n_finite"], d["n_nan"], d["n_inf"]) == (4, 3, 1, 0)
    assert s["hd95"]["mean"] == pytest.approx(3.0)
    assert s["hd95"]["median"] == pytest.approx(3.0)
    assert s["hd95"]["std"] == pytest.approx(1.0)
    assert (s["hd95"]["n_finite"], s["hd95"]["n_nan"], s["hd95"]["n_inf"]) == (2, 1, 1)


def test_summarize_no_finite_values_and_errors():
    s = summarize([{"hd95": math.inf}, {"hd95": math.nan}])["hd95"]
    assert math.isnan(s["mean"]) and math.isnan(s["std"]) and math.isnan(s["median"])
    assert (s["n_nan"], s["n_inf"]) == (1, 1)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="case 1"):
        summarize([{"dice": 1.0}, {"iou": 1.0}])


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(mask_pairs(), min_size=1, max_size=6))
def test_summarize_of_case_metrics(pairs):
    per_case = [case_metrics(a, b) for a, b in pairs]
    s = summarize(per_case)
    for name in metrics.METRICS:
        values = np.array([c[name] for c in per_case])
        finite = values[np.isfinite(values)]
        st_ = s[name]
        assert st_["n"] == len(pairs)
        assert st_["n_finite"] + st_["n_nan"] + st_["n_inf"] == len(pairs)
        if finite.size:
            assert st_["mean"] == pytest.approx(finite.mean())
            assert finite.min() - 1e-12 <= st_["median"] <= finite.max() + 1e-12


# --------------------------------------------------------------------------- multiclass


@settings(max_examples=50, deadline=None)
@given(shape=shapes(32), data=st.data())
def test_multiclass_matches_binary(shape, data):
    labels = st.integers(0, 3)
    p = data.draw(hnp.arrays(np.int64, shape, elements=labels))
    g = data.draw(hnp.arrays(np.int64, shape, elements=labels))
    out = multiclass(p, g, spacing=(1.0, 2.0))
    present = sorted((set(np.unique(p)) | set(np.unique(g))) - {0})
    assert list(out) == present
    for c in present:
        np.testing.assert_equal(out[c], case_metrics(p == c, g == c, spacing=(1.0, 2.0)))


def test_multiclass_explicit_classes():
    p = np.zeros((5, 5), dtype=np.int64)
    p[1:3, 1:3] = 2
    out = multiclass(p, p, classes=[2, 7], metrics=("dice", "hd95"))
    assert out[2] == {"dice": 1.0, "hd95": 0.0}
    assert math.isnan(out[7]["dice"]) and math.isnan(out[7]["hd95"])
    with pytest.raises(ValueError, match="background"):
        multiclass(p, p, classes=[0, 2])
    with pytest.raises(ValueError, match="unknown metric"):
        case_metrics(p == 2, p == 2, metrics=("f1",))
