"""The readers on the real Kvasir-SEG and CHASE_DB1 releases in ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hidiff.data import get_reader, load_case

pytestmark = pytest.mark.data


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
    assert set(np.unique(mask).tolist()) <= {0, 1}


def test_kvasir_cases_and_pairs(kvasir_root):
    reader = get_reader("kvasir-seg")
    info, cases = reader.open(kvasir_root)
    assert len(cases) == 1000
    assert len({c.case_id for c in cases}) == 1000
    assert info.num_classes == 1 and info.channels == 3 and info.policy == "resize"
    fractions = []
    for case in cases[::125]:  # 8 cases spread over the set
        image, mask = reader.load(case, info)
        _check_pair(image, mask)
        with Image.open(case.image) as img:
            assert img.size == (image.shape[1], image.shape[0])
        fraction = float(mask.mean())
        assert 0.0 < fraction < 0.9, (case.case_id, fraction)
        fractions.append(fraction)
    assert 0.05 < np.mean(fractions) < 0.35  # dataset mean 0.154


def test_kvasir_mask_threshold_matches_the_grey_levels(kvasir_root):
    """Masks are RGB JPEG with grey levels: ours equals luma > 127 and has almost no grey."""
    case = get_reader("kvasir-seg").list_cases(kvasir_root)[0]
    with Image.open(case.mask) as img:
        assert img.mode == "RGB"
        grey = np.asarray(img.convert("L"))
    _, mask = load_case(case, get_reader("kvasir-seg").info())
    np.testing.assert_array_equal(mask, (grey > 127).astype(np.uint8))
    assert np.mean((grey > 20) & (grey < 235)) < 0.01


def test_chase_cases_and_pairs(chase_root):
    reader = get_reader("chase-db1")
    info, cases = reader.open(chase_root)
    assert len(cases) == 28
    assert [c.case_id for c in cases[:3]] == ["Image_01L", "Image_01R", "Image_02L"]
    assert all("2ndHO" in c.extras for c in cases)
    assert info.policy == "tile" and info.num_classes == 1
    fractions = []
    for case in cases[::7]:
        image, mask = reader.load(case, info)
        _check_pair(image, mask)
        assert image.shape == (960, 999, 3)
        fractions.append(float(mask.mean()))
        assert 0.03 < fractions[-1] < 0.12
    assert 0.05 < np.mean(fractions) < 0.09  # dataset mean 0.069


def test_chase_second_observer(chase_root):
    reader = get_reader("chase-db1")
    case = reader.list_cases(chase_root)[0]
    _, first = load_case(case, reader.info())
    _, second = load_case(case, reader.info(), mask_key="2ndHO")
    assert set(np.unique(second).tolist()) == {0, 1}
    dice = 2 * np.sum(first & second) / (first.sum() + second.sum())
    assert 0.6 < dice < 0.99  # observers agree on most, not all, vessel pixels
