"""Bit packing of bipolar vectors and the XNOR-popcount dot product (method §7).

Bit layout (the Larq Compute Engine convention, binding for every runtime of this project):

- the LAST axis, of length n, is packed into ``ceil(n / 32)`` int32 words;
- element ``c`` goes to word ``c // 32``, bit ``c % 32``, least significant bit first;
- bit 1 means -1 (``x < 0``), bit 0 means +1 (so 0, -0.0 and NaN give bit 0, as ``sign`` does);
- the unused high bits of the last word are 0.

Example: ``[-1, +1, +1, -1]`` packs to the single word ``0b1001 = 9``; 32 negatives pack to the
word ``0xFFFFFFFF``, which as int32 is ``-1``.

Dot identity: for bipolar vectors a, b of length n with packed words A, B (unused bits 0 in both)::

    a . b = (#equal) - (#different) = n - 2 * popcount(A XOR B)

summed over all words. XNOR-popcount is the same thing written as ``2 * popcount(XNOR) - n``; the
XOR form needs no masking of the unused bits because they are 0 in both operands.

``popcount`` counts the 1-bits of each element's two's-complement pattern at its own width (int32
-1 has 32 bits set). Note ``np.bitwise_count`` on a *signed* array counts the bits of the absolute
value, so the words are viewed as unsigned first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["WORD_BITS", "bitpack", "bitunpack", "num_words", "popcount", "xnor_popcount_dot"]

WORD_BITS = 32

_BIT_WEIGHTS = np.left_shift(np.uint32(1), np.arange(WORD_BITS, dtype=np.uint32))
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def num_words(n: int) -> int:
    """Number of 32-bit words that hold ``n`` bits: ``ceil(n / 32)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n + WORD_BITS - 1) // WORD_BITS


def bitpack(x: npt.ArrayLike) -> np.ndarray:
    """Pack the last axis of ``x`` into int32 words: bit 1 where ``x < 0``, LSB first.

    Returns int32 of shape ``(..., ceil(n / 32))`` where ``n = x.shape[-1]``.
    """
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError("bitpack needs at least one axis (the axis to pack is the last one)")
    n = arr.shape[-1]
    words = num_words(n)
    negative = arr < 0
    pad = words * WORD_BITS - n
    if pad:
        widths = [(0, 0)] * (arr.ndim - 1) + [(0, pad)]
        negative = np.pad(negative, widths, constant_values=False)
    grouped = negative.reshape(arr.shape[:-1] + (words, WORD_BITS)).astype(np.uint32)
    packed = np.bitwise_or.reduce(grouped * _BIT_WEIGHTS, axis=-1)
    return np.ascontiguousarray(packed, dtype=np.uint32).view(np.int32)


def _as_uint32(bits: npt.ArrayLike) -> np.ndarray:
    """View an integer word array as uint32, refusing values that do not fit in 32 bits."""
    arr = np.asarray(bits)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"packed words must have an integer dtype, got {arr.dtype}")
    if arr.dtype.itemsize == 4:
        return arr.view(np.uint32) if arr.dtype != np.uint32 else arr
    wide = arr.astype(np.int64)
    if np.any((wide < -(2**31)) | (wide >= 2**32)):
        raise ValueError("packed words must be 32-bit values (int32 or uint32 range)")
    return (wide & 0xFFFFFFFF).astype(np.uint32)


def bitunpack(bits: npt.ArrayLike, n: int) -> np.ndarray:
    """Inverse of ``bitpack``: words ``(..., ceil(n / 32))`` -> float32 +-1 of shape ``(..., n)``.

    Raises ValueError when the word count is not ``ceil(n / 32)`` or when an unused bit of the last
    word is set (such words cannot come from ``bitpack`` and would break the dot identity).
    """
    words = _as_uint32(bits)
    if words.ndim == 0:
        raise ValueError("bitunpack needs at least one axis (the packed word axis)")
    if words.shape[-1] != num_words(n):
        raise ValueError(
            f"expected ceil({n} / 32) = {num_words(n)} words on the last axis, "
            f"got {words.shape[-1]}"
        )
    unpacked = (words[..., None] & _BIT_WEIGHTS) != 0
    flat = unpacked.reshape(words.shape[:-1] + (words.shape[-1] * WORD_BITS,))
    if np.any(flat[..., n:]):
        raise ValueError("unused bits of the last word must be 0")
    return np.where(flat[..., :n], -1, 1).astype(np.float32)


def _popcount_lut(words: np.ndarray) -> np.ndarray:
    """Portable popcount of an unsigned array: sum of a 256-entry table over its bytes."""
    as_bytes = np.ascontiguousarray(words)[..., None].view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1)


def popcount(words: npt.ArrayLike) -> np.ndarray:
    """Per-element count of 1-bits of an integer array (two's complement at the element's width).

    Returns int64 of the same shape. Uses ``np.bitwise_count`` (NumPy >= 2.0) on the unsigned view,
    else a byte lookup table.
    """
    arr = np.asarray(words)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"popcount needs an integer dtype, got {arr.dtype}")
    unsigned = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(unsigned).astype(np.int64)
    return _popcount_lut(unsigned)


def xnor_popcount_dot(a_bits: npt.ArrayLike, b_bits: npt.ArrayLike, n: int) -> np.ndarray:
    """Dot product of two packed bipolar vectors of length ``n``: ``n - 2 * popcount(a XOR b)``.

    ``a_bits`` and ``b_bits`` hold ``ceil(n / 32)`` words on the last axis (as ``bitpack`` makes
    them); the leading axes broadcast. Returns int64 of the broadcast leading shape.
    """
    a = _as_uint32(a_bits)
    b = _as_uint32(b_bits)
    words = num_words(n)
    for name, arr in (("a_bits", a), ("b_bits", b)):
        if arr.ndim == 0 or arr.shape[-1] != words:
            raise ValueError(
                f"{name} must have ceil({n} / 32) = {words} words on the last axis, "
                f"got shape {arr.shape}"
            )
    differing = popcount(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)
    return np.int64(n) - 2 * differing
