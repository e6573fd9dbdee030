"""Tests for reference.quantize.sign and reference.bitpack (method §7 bit conventions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference.bitpack import (
    _popcount_lut,
    bitpack,
    bitunpack,
    num_words,
    popcount,
    xnor_popcount_dot,
)
from reference.quantize import sign

# Values that stress the sign convention: exact zeros of both signs, tiny magnitudes, NaN.
SPECIAL = np.array([-2.0, -1.0, -1e-300, -0.0, 0.0, 1e-300, 1.0, 2.0, np.nan, -np.inf, np.inf])


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Float64 array, mostly integers in -2..2 (frequent exact zeros) plus special values."""
    out = rng.integers(-2, 3, size=shape).astype(np.float64)
    special = rng.random(shape) < 0.1
    out[special] = rng.choice(SPECIAL, size=int(special.sum()))
    return out


def _oracle_sign(x: np.ndarray) -> np.ndarray:
    return np.array([-1.0 if v < 0 else 1.0 for v in x.ravel()]).reshape(x.shape)


# ---- sign -------------------------------------------------------------------------------------


def test_sign_zero_nan_and_dtype():
    x = np.array([-3.0, -0.0, 0.0, 0.5, np.nan, -np.inf], dtype=np.float32)
    out = sign(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-1, 1, 1, 1, 1, -1])
    assert sign(np.array([-1, 0, 1])).dtype == np.float64
    assert sign(0.0) == 1.0 and sign(-0.0) == 1.0 and sign(np.nan) == 1.0


# ---- bit layout on hand-made examples ---------------------------------------------------------


def test_hand_made_layout():
    assert bitpack([-1.0, 1.0, 1.0, -1.0]).tolist() == [0b1001]
    assert bitpack([1.0, -1.0]).tolist() == [0b10]
    # 32 negatives: every bit set, 0xFFFFFFFF as int32 is -1.
    assert bitpack(-np.ones(32)).tolist() == [-1]
    # 33 negatives: a full word then one bit in word 1.
    assert bitpack(-np.ones(33)).tolist() == [-1, 1]
    # Element 31 alone: the sign bit of word 0.
    x = np.ones(32)
    x[31] = -1
    assert bitpack(x).tolist() == [np.iinfo(np.int32).min]
    # Element 32 -> word 1, bit 0; element 37 -> word 1, bit 5.
    x = np.ones(40)
    x[[32, 37]] = -1
    assert bitpack(x).tolist() == [0, 0b100001]


def test_zeros_and_nan_map_to_bit_zero():
    assert bitpack([0.0, -0.0, 0, np.nan, 1e-300]).tolist() == [0]
    assert bitpack(np.array([0, -1, 0], dtype=np.int8)).tolist() == [0b010]


def test_output_dtype_and_shape():
    out = bitpack(np.ones((2, 3, 65)))
    assert out.dtype == np.int32 and out.shape == (2, 3, 3)
    assert bitpack(np.ones((4, 0))).shape == (4, 0)
    assert [num_words(n) for n in (0, 1, 31, 32, 33, 64, 65)] == [0, 1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 63, 64, 65, 100])
def test_unused_bits_are_zero(n):
    words = bitpack(-np.ones(n)).view(np.uint32)
    used = n - 32 * (num_words(n) - 1)
    assert int(words[-1]) == (1 << used) - 1
    assert all(int(v) == 0xFFFFFFFF for v in words[:-1])


def test_bitunpack_rejects_bad_words():
    with pytest.raises(ValueError, match="words"):
        bitunpack(np.zeros(2, dtype=np.int32), 5)
    with pytest.raises(ValueError, match="unused bits"):
        bitunpack(np.array([1 << 5], dtype=np.int32), 5)
    with pytest.raises(ValueError, match="2 words"):
        xnor_popcount_dot(np.zeros(1, np.int32), np.zeros(1, np.int32), 40)


# ---- round trip -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 200),
    lead=st.sampled_from([(), (1,), (3,), (2, 2)]),
    seed=st.integers(0, 2**32 - 1),
)
@example(n=31, lead=(2,), seed=0)
@example(n=32, lead=(2,), seed=1)
@example(n=33, lead=(2,), seed=2)
@example(n=64, lead=(2,), seed=3)
@example(n=65, lead=(2,), seed=4)
def test_round_trip(n, lead, seed):
    x = _values(np.random.default_rng(seed), lead + (n,))
    packed = bitpack(x)
    assert packed.dtype == np.int32 and packed.shape == lead + (num_words(n),)
    back = bitunpack(packed, n)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(back, _oracle_sign(x))
    np.testing.assert_array_equal(bitpack(back), packed)
    # Unused bits of the last word are 0.
    spare = 32 * num_words(n) - n
    if spare:
        assert not np.any(packed[..., -1].view(np.uint32) >> np.uint32(32 - spare))


# ---- popcount ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=50))
def test_popcount_int32(values):
    words = np.array(values, dtype=np.int32)
    expected = [bin(v & 0xFFFFFFFF).count("1") for v in values]
    assert popcount(words).tolist() == expected
    assert _popcount_lut(words.view(np.uint32)).tolist() == expected
    assert popcount(words).dtype == np.int64


def test_popcount_other_widths():
    assert popcount(np.array([-1], dtype=np.int64)).tolist() == [64]
    assert popcount(np.array([255, 3], dtype=np.uint8)).tolist() == [8, 2]
    assert popcount(np.array([-1, 0], dtype=np.int16)).tolist() == [16, 0]
    with pytest.raises(TypeError):
        popcount(np.array([1.0]))


# ---- the dot identity -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 200),
    leads=st.sampled_from([((), ()), ((3,), ()), ((3,), (1,)), ((3,), (3,)), ((2, 1), (4,))]),
    seed=st.integers(0, 2**32 - 1),
)
@example(n=31, leads=((), ()), seed=0)
@example(n=32, leads=((), ()), seed=1)
@example(n=33, leads=((), ()), seed=2)
@example(n=64, leads=((3,), (1,)), seed=3)
@example(n=65, leads=((2, 1), (4,)), seed=4)
def test_dot_identity(n, leads, seed):
    a_lead, b_lead = leads
    rng = np.random.default_rng(seed)
    a = _values(rng, a_lead + (n,))
    b = _values(rng, b_lead + (n,))
    got = xnor_popcount_dot(bitpack(a), bitpack(b), n)
    expected = np.einsum("...i,...i->...", _oracle_sign(a), _oracle_sign(b))
    assert got.dtype == np.int64
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_dot_extremes():
    n = 70
    plus, minus = bitpack(np.ones(n)), bitpack(-np.ones(n))
    assert xnor_popcount_dot(plus, plus, n) == n
    assert xnor_popcount_dot(plus, minus, n) == -n
    assert xnor_popcount_dot(bitpack(np.zeros(n)), minus, n) == -n  # sign(0) = +1
