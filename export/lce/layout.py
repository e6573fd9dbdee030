"""Layout bookkeeping of the ONNX -> TFLite translation.

Every translated ONNX value keeps its *logical* (ONNX, NCHW) shape and is *stored* in the TFLite
graph as ``logical.transpose(perm)``: storage axis ``k`` holds logical axis ``perm[k]``. Image
tensors live as NHWC (``perm = (0, 2, 3, 1)``); ONNX ``Transpose`` nodes only change ``perm``
(no TFLite op), and a ``Reshape`` is done on the storage when the axes it merges or splits are
adjacent and in order there (the X-Former's ``(N, C, H, W) -> (N, C, HW) -> (N, HW, C)`` token
round trip costs nothing). A TFLite ``TRANSPOSE`` is emitted only where an op needs another
layout (a ``RESHAPE`` where the permutation moves size-1 axes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NCHW_TO_NHWC", "Value", "compose_transpose", "relative_perm", "reshape_plan",
           "storage_shape"]

NCHW_TO_NHWC = (0, 2, 3, 1)


@dataclass(frozen=True)
class Value:
    """A translated ONNX value: TFLite tensor ``index`` holding ``logical.transpose(perm)``."""

    index: int
    shape: tuple[int, ...]  # logical (ONNX) shape
    perm: tuple[int, ...]
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def stored(self) -> tuple[int, ...]:
        return storage_shape(self.shape, self.perm)


def storage_shape(shape, perm) -> tuple[int, ...]:
    return tuple(int(shape[p]) for p in perm)


def relative_perm(have, want) -> tuple[int, ...]:
    """The TRANSPOSE perm taking storage ``logical.transpose(have)`` to
    ``logical.transpose(want)``."""
    return tuple(have.index(w) for w in want)


def only_moves_ones(shape, have, want) -> bool:
    """True when going from ``have`` to ``want`` keeps the order of the non-1 axes (a reshape)."""
    big_have = [a for a in have if shape[a] != 1]
    big_want = [a for a in want if shape[a] != 1]
    return big_have == big_want


def compose_transpose(perm, onnx_perm) -> tuple[int, ...]:
    """``perm`` of ``Transpose(x, onnx_perm)`` when ``x`` is stored with ``perm``."""
    return tuple(list(onnx_perm).index(p) for p in perm)


def _groups(src, dst):
    """Split a reshape ``src -> dst`` (non-1 axes only) into groups of axes with equal products.

    Returns a list of (src axes, dst axes) or None when the sizes do not line up.
    """
    a = [i for i, s in enumerate(src) if s != 1]
    b = [j for j, s in enumerate(dst) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i >= len(a) or j >= len(b):
            return None
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                ga.append(a[i])
                pa *= src[a[i]]
                i += 1
            else:
                if j >= len(b):
                    return None
                gb.append(b[j])
                pb *= dst[b[j]]
                j += 1
        groups.append((ga, gb))
    return groups


def reshape_plan(shape, perm, new_shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How to reshape a value stored with ``perm`` to logical ``new_shape`` without a transpose.

    Returns ``(new storage shape, new perm)`` or None when the merged/split axes are not
    adjacent and in order in the storage. The leading (batch) axis stays first when the reshape
    keeps it; other size-1 axes of the result go last in the storage.
    """
    shape, new_shape = tuple(shape), tuple(new_shape)
    if int(np.prod(shape)) != int(np.prod(new_shape)):
        return None
    keep_batch = bool(shape) and bool(new_shape) and shape[0] == new_shape[0] and perm[0] == 0
    src = shape[1:] if keep_batch else shape
    dst = new_shape[1:] if keep_batch else new_shape
    off = 1 if keep_batch else 0
    order = [p - off for p in perm[off:]] if keep_batch else list(perm)
    groups = _groups(src, dst)
    if groups is None:
        return None
    big_order = [a for a in order if src[a] != 1]  # storage order of the non-1 source axes
    placed = []
    for ga, gb in groups:
        pos = [big_order.index(a) for a in ga]
        if pos != list(range(pos[0], pos[0] + len(pos))):
            return None
        placed.append((pos[0], gb))
    placed.sort()
    axes = [a for _, gb in placed for a in gb]
    axes += [j for j in range(len(dst)) if dst[j] == 1]
    new_perm = tuple(a + off for a in axes)
    if keep_batch:
        new_perm = (0, *new_perm)
    return storage_shape(new_shape, new_perm), new_perm
