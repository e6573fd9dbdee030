"""Channel-last (NHWC) elementwise ops for the packed backend.

The packed kernel reads and writes NHWC, while the graph is NCHW. Rather than transposing every
binary-conv output back, elementwise ops whose operands include an NHWC value run in NHWC:
broadcast operands (per-channel ``(C, 1, 1)`` constants, ``(N, C, 1, 1)`` step tables, scalars)
are viewed channel-last, full-size NCHW operands are transposed once (and cached). The result
is the same IEEE operation on the same pairs of numbers, so it is bit-identical to NCHW.

A per-channel operand broadcast over a contiguous ``(N, H, W, C)`` array makes NumPy loop over
``C`` elements at a time; :func:`binary` instead views the big array as rows of ``C * k`` values
and tiles the channel vector ``k`` times (two to three times faster for C = 32).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ELEMENTWISE", "binary", "prelu", "view"]

_ROW = 16384  # target row length (elements) of the tiled per-channel fast path


def view(x: np.ndarray) -> np.ndarray:
    """A broadcastable NCHW operand (rank <= 4) as an NHWC-broadcastable view."""
    x = np.asarray(x)
    if x.ndim < 4:
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return x.transpose(0, 2, 3, 1)


def _rows(big: np.ndarray, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``big`` (contiguous N, H, W, C) as rows of ``C * k`` and ``vec`` (1, 1, 1, C) tiled."""
    c = big.shape[-1]
    if not big.flags.c_contiguous or vec.shape != (1, 1, 1, c) or big.size < 4 * _ROW:
        return None
    pixels = big.size // c
    k = max(1, _ROW // c)
    while pixels % k:
        k //= 2
    if k < 2:
        return None
    return big.reshape(-1, c * k), np.tile(np.ascontiguousarray(vec).reshape(c), k)


def binary(ufunc, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``ufunc(a, b)`` on NHWC operands, with the tiled per-channel fast path; ``out``: a
    C-contiguous array of the result's shape to write into (it may be ``a`` or ``b``)."""
    if a.ndim == 4 and b.ndim == 4 and a.shape != b.shape:
        for big, small, first in ((a, b, True), (b, a, False)):
            fast = _rows(big, small)
            if fast is not None:
                rows, vec = fast
                dest = None if out is None else out.reshape(rows.shape)
                result = ufunc(rows, vec, out=dest) if first else ufunc(vec, rows, out=dest)
                return result.reshape(big.shape)
    return np.asarray(ufunc(a, b, out=out))


def prelu(x: np.ndarray, slope: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x < 0 ? x * slope : x`` (see :func:`edge_runtime.npops._prelu` for the max form)."""
    scaled = binary(np.multiply, x, slope)
    if x.dtype == np.float32 and np.all((slope >= 0) & (slope <= 1)):
        return np.maximum(x, scaled, out=scaled if out is None else out)
    result = np.where(x < 0, scaled, x).astype(x.dtype, copy=False)
    if out is not None:
        out[...] = result
        return out
    return result


def _ufunc_kernel(ufunc):
    return lambda a, b, out=None: binary(ufunc, a, b, out=out)


#: op type -> NHWC kernel over two operands
ELEMENTWISE = {
    "Add": _ufunc_kernel(np.add),
    "Sub": _ufunc_kernel(np.subtract),
    "Mul": _ufunc_kernel(np.multiply),
    "PRelu": prelu,
}
