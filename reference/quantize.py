"""Bipolar quantisation: the project's one definition of ``sign`` (method §7).

Formula::

    sign(x) = -1  if x < 0
              +1  otherwise          (so sign(0) = sign(-0.0) = +1 and sign(NaN) = +1)

It is written as ``where(x < 0, -1, +1)``. ``np.sign`` is never used on a binary path: it maps 0 to
0 and NaN to NaN, which is not a bipolar value and breaks the XNOR-popcount identity.

Bit convention (see ``reference.bitpack``): a bipolar value is stored as one bit, 1 for -1 and 0
for +1, i.e. ``bit = (x < 0)``. ``sign`` and ``bitpack`` therefore agree on every input, zeros and
NaN included.

Output dtype: float32 for float32 input (so a float32 pipeline stays float32), float64 for every
other input dtype (integers, bools, float16, float64, Python scalars and lists).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["sign"]


def sign(x: npt.ArrayLike) -> np.ndarray:
    """Return ``where(x < 0, -1, +1)`` as a float array (sign(0) = +1, sign(NaN) = +1).

    The result has the shape of ``x``; its dtype is float32 when ``x`` is float32, else float64.
    """
    arr = np.asarray(x)
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    return np.where(arr < 0, -1, 1).astype(dtype)
