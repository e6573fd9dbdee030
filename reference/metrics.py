"""Segmentation metrics on binary masks (method §10). NumPy only.

Inputs. ``pred`` and ``gt`` are 2-D arrays of the same shape holding a boolean mask: dtype bool,
or an integer dtype with values in {0, 1}. Floating-point arrays are refused (threshold the
probabilities first), as are zero-size arrays. Inputs are never modified: every function only
reads them (boolean copies are made where a conversion is needed).

Notation. A = pred, B = gt (as pixel sets), N = number of pixels,
TP = |A ∩ B|, FP = |A \\ B|, FN = |B \\ A|, TN = N - TP - FP - FN.

Formulas and empty-mask rules
-----------------------------
``dice``      D = 2|A ∩ B| / (|A| + |B|)            NaN when A and B are both empty
``iou``       J = |A ∩ B| / |A ∪ B|  (= D / (2 - D)) NaN when A and B are both empty
``recall``    TP / (TP + FN)   (sensitivity)         NaN when B (gt) is empty
``accuracy``  (TP + TN) / N                          always defined
``hd95``      see below                              NaN when both are empty,
                                                     +inf when exactly one is empty

Both-empty Dice/IoU are NaN rather than 1.0: a perfect score there would hide a degenerate case.
``summarize`` skips NaN (and inf) values in the statistics and reports how many there were.

HD95 (95th percentile of the symmetric surface distance)
--------------------------------------------------------
Surface. S(M) = M AND NOT erode(M), where erode uses the 4-connected cross structuring element
(the pixel and its up/down/left/right neighbours) and everything outside the image counts as
background. So a foreground pixel is on the surface when it touches the image border or has a
4-neighbour in the background. A non-empty mask always has a non-empty surface.

Directed distances. For every pixel p of S(A), d(p, S(B)) = min over q in S(B) of
sqrt((dy * (p_row - q_row))^2 + (dx * (p_col - q_col))^2), with ``spacing = (dy, dx)``
(default (1, 1), i.e. pixels). Likewise for every pixel of S(B) to S(A).

HD95 = percentile_95( concat(d(S(A) -> S(B)), d(S(B) -> S(A))) ), NumPy's default linear
interpolation (``np.percentile(x, 95)``). The distances are exact: for every column holding a
pixel of the target surface, the nearest target row in that column is found by two cumulative
scans (the nearest point of a column is the nearest row, whatever the horizontal offset); each
query pixel then takes the minimum over columns, first within a few columns of itself (kept when
no farther column could be closer), otherwise over every occupied column (chunked; the
orientation with fewer occupied lines is used). Worst case O(|S(A)| * occupied columns).

Aggregation
-----------
``summarize(per_case)`` gives, for each metric, the mean, standard deviation (population,
ddof = 0) and median over the *finite* values only, together with ``n`` (cases), ``n_finite``,
``n_nan`` and ``n_inf`` (e.g. HD95 = +inf when exactly one mask is empty: such cases are excluded
from the mean but counted). With no finite value, mean/std/median are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "METRICS",
    "accuracy",
    "case_metrics",
    "dice",
    "directed_surface_distances",
    "hd95",
    "iou",
    "multiclass",
    "recall",
    "summarize",
    "surface",
]

METRICS = ("dice", "iou", "recall", "accuracy", "hd95")

# Elements of one (chunk, columns) block of squared distances in the HD95 search.
_CHUNK_ELEMENTS = 1 << 21
# Half-width (in columns) of the local search tried before the exhaustive one.
_WINDOW = 8


# --------------------------------------------------------------------------- input checks


def _as_mask(x: object, name: str) -> np.ndarray:
    """Read-only view of ``x`` as a 2-D boolean array (a copy only when the dtype is not bool)."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); metrics need at least one pixel")
    if a.dtype == np.bool_:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(
            f"{name} must be bool or a 0/1 integer array, got dtype {a.dtype} "
            "(threshold probabilities before computing metrics)"
        )
    if np.any((a != 0) & (a != 1)):
        raise ValueError(f"{name} must only hold 0 and 1, got values {np.unique(a)[:8]}")
    return a != 0


def _pair(pred: object, gt: object) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(pred)
    b = np.asarray(gt)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: pred has shape {a.shape}, gt has shape {b.shape}")
    return _as_mask(a, "pred"), _as_mask(b, "gt")


def _spacing(spacing: Sequence[float] | None) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0
    values = tuple(float(s) for s in spacing)
    if len(values) != 2 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be two finite positive numbers (dy, dx), got {spacing!r}")
    return values  # type: ignore[return-value]


def _counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) as Python ints."""
    tp = int(np.count_nonzero(a & b))
    na = int(np.count_nonzero(a))
    nb = int(np.count_nonzero(b))
    fp = na - tp
    fn = nb - tp
    return tp, fp, fn, a.size - tp - fp - fn


# --------------------------------------------------------------------------- overlap metrics


def dice(pred: object, gt: object) -> float:
    """Dice = 2|A ∩ B| / (|A| + |B|); NaN when both masks are empty."""
    tp, fp, fn, _ = _counts(*_pair(pred, gt))
    denom = 2 * tp + fp + fn
    return math.nan if denom == 0 else 2.0 * tp / denom


def iou(pred: object, gt: object) -> float:
    """IoU (Jaccard) = |A ∩ B| / |A ∪ B|; NaN when both masks are empty."""
    tp, fp, fn, _ = _counts(*_pair(pred, gt))
    denom = tp + fp + fn
    return math.nan if denom == 0 else tp / denom


def recall(pred: object, gt: object) -> float:
    """Recall (sensitivity) = TP / (TP + FN); NaN when gt is empty."""
    tp, _, fn, _ = _counts(*_pair(pred, gt))
    denom = tp + fn
    return math.nan if denom == 0 else tp / denom


def accuracy(pred: object, gt: object) -> float:
    """Pixel accuracy = (TP + TN) / N; always defined (zero-size arrays are refused)."""
    tp, fp, fn, tn = _counts(*_pair(pred, gt))
    return (tp + tn) / (tp + fp + fn + tn)


# --------------------------------------------------------------------------- surface distances


def surface(mask: object) -> np.ndarray:
    """Surface pixels: mask AND NOT erode(mask), 4-connected cross, outside = background."""
    m = _as_mask(mask, "mask")
    p = np.pad(m, 1, constant_values=False)
    eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~eroded


def _nearest_distances(
    queries: np.ndarray, target: np.ndarray, spacing: tuple[float, float]
) -> np.ndarray:
    """Exact Euclidean distance from each True pixel of ``queries`` to the nearest of ``target``.

    Both are 2-D boolean arrays of one shape and ``target`` has at least one True pixel. Returns
    the distances in the row-major order of the query pixels.
    """
    dy, dx = spacing
    # Reduce along the axis that leaves fewer occupied lines to scan per query.
    occupied_cols = np.count_nonzero(target.any(axis=0))
    occupied_rows = np.count_nonzero(target.any(axis=1))
    transposed = occupied_rows < occupied_cols
    if transposed:
        queries_w, target_w, dy, dx = queries.T, target.T, dx, dy
    else:
        queries_w, target_w = queries, target
    qy, qx = np.nonzero(queries_w)
    if qy.size == 0:
        return np.zeros(0, dtype=np.float64)
    w_total = target_w.shape[1]
    occupied = target_w.any(axis=0)
    cols = np.flatnonzero(occupied)
    feat = target_w[:, cols]
    h = feat.shape[0]
    rows = np.arange(h, dtype=np.int64)[:, None]
    far = 2 * h + 1  # farther than any real feature in the same column
    above = np.maximum.accumulate(np.where(feat, rows, -far), axis=0)
    below = np.minimum.accumulate(np.where(feat, rows, far)[::-1], axis=0)[::-1]
    # Every selected column holds a feature, so each entry below is a true (finite) row gap.
    gap = np.minimum(rows - above, below - rows)
    col_sq = (gap.astype(np.float64) * dy) ** 2  # (h, C) squared vertical distance per column

    # Phase 1: look only at columns within +-_WINDOW of the query. The result is exact whenever
    # it is no farther than any column outside the window could possibly be.
    full_sq = np.full((h, w_total), np.inf)
    full_sq[:, cols] = col_sq
    best = np.full(qy.size, np.inf)
    for off in range(-_WINDOW, _WINDOW + 1):
        xs = qx + off
        ok = (xs >= 0) & (xs < w_total)
        cand = full_sq[qy[ok], xs[ok]] + (off * dx) ** 2
        best[ok] = np.minimum(best[ok], cand)
    out = np.sqrt(best)
    pending = np.flatnonzero(best > ((_WINDOW + 1) * dx) ** 2)

    # Phase 2: exhaustive search over every occupied column for the remaining queries.
    chunk = max(1, _CHUNK_ELEMENTS // cols.size)
    for start in range(0, pending.size, chunk):
        idx = pending[start : start + chunk]
        horiz = (qx[idx, None] - cols[None, :]).astype(np.float64) * dx
        sq = col_sq[qy[idx]] + horiz * horiz
        out[idx] = np.sqrt(sq.min(axis=1))
    if transposed:
        # Restore the row-major order of the original (untransposed) query pixels.
        order = np.lexsort((qy, qx))
        out = out[order]
    return out


def directed_surface_distances(
    pred: object, gt: object, *, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(d(S(pred) -> S(gt)), d(S(gt) -> S(pred))); both masks must be non-empty."""
    a, b = _pair(pred, gt)
    sp = _spacing(spacing)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    sa, sb = surface(a), surface(b)
    return _nearest_distances(sa, sb, sp), _nearest_distances(sb, sa, sp)


def hd95(pred: object, gt: object, *, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the symmetric surface distance (pixels, or units of ``spacing``).

    NaN when both masks are empty, +inf when exactly one is empty.
    """
    a, b = _pair(pred, gt)
    sp = _spacing(spacing)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return math.nan
    if has_a != has_b:
        return math.inf
    d_ab, d_ba = directed_surface_distances(a, b, spacing=sp)
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


# --------------------------------------------------------------------------- per case, aggregate


def case_metrics(
    pred: object,
    gt: object,
    *,
    spacing: Sequence[float] | None = None,
    metrics: Iterable[str] = METRICS,
) -> dict[str, float]:
    """All requested metrics of one case, as a dict name -> float (order of ``metrics``)."""
    funcs = {"dice": dice, "iou": iou, "recall": recall, "accuracy": accuracy}
    out: dict[str, float] = {}
    for name in metrics:
        if name == "hd95":
            out[name] = hd95(pred, gt, spacing=spacing)
        elif name in funcs:
            out[name] = funcs[name](pred, gt)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {METRICS}")
    return out


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Aggregate per-case metric dicts.

    Returns ``{metric: {"mean", "std", "median", "n", "n_finite", "n_nan", "n_inf"}}`` where mean,
    std (ddof = 0) and median are over the finite values only (NaN if there are none); ``n_nan``
    and ``n_inf`` count the skipped cases. Every case must have the same metric names.
    """
    cases = list(per_case)
    if not cases:
        raise ValueError("summarize needs at least one case")
    names = list(cases[0])
    for i, case in enumerate(cases):
        if set(case) != set(names):
            raise ValueError(
                f"case {i} has metrics {sorted(case)}, expected {sorted(names)} like case 0"
            )
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = np.array([float(case[name]) for case in cases], dtype=np.float64)
        finite = values[np.isfinite(values)]
        stats: dict[str, float] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std()) if finite.size else math.nan,
            "median": float(np.median(finite)) if finite.size else math.nan,
            "n": int(values.size),
            "n_finite": int(finite.size),
            "n_nan": int(np.count_nonzero(np.isnan(values))),
            "n_inf": int(np.count_nonzero(np.isinf(values))),
        }
        out[name] = stats
    return out


def multiclass(
    pred_labels: object,
    gt_labels: object,
    *,
    classes: Iterable[int] | None = None,
    spacing: Sequence[float] | None = None,
    metrics: Iterable[str] = METRICS,
) -> dict[int, dict[str, float]]:
    """Per-class metrics from two 2-D integer label maps (0 = background, never scored).

    Class ``c`` is scored as the binary pair (pred_labels == c, gt_labels == c). ``classes``
    defaults to every non-zero label present in either map, ascending; a listed class absent from
    both maps gets the both-empty values (NaN Dice/IoU/recall/HD95, accuracy 1).
    """
    p = np.asarray(pred_labels)
    g = np.asarray(gt_labels)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred has shape {p.shape}, gt has shape {g.shape}")
    for name, arr in (("pred_labels", p), ("gt_labels", g)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D label map, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise TypeError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    if classes is None:
        labels = np.union1d(np.unique(p), np.unique(g))
        chosen = [int(c) for c in labels if c != 0]
    else:
        chosen = [int(c) for c in classes]
        if 0 in chosen:
            raise ValueError("class 0 is background and is not scored")
    metric_names = tuple(metrics)
    return {c: case_metrics(p == c, g == c, spacing=spacing, metrics=metric_names) for c in chosen}
