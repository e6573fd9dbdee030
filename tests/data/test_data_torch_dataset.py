"""The torch SegmentationDataset: shapes, normalisation, augmentation only in training, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hidiff.data import get_reader, load_split
from hidiff.data.io import load_case
from hidiff.data.torch_dataset import SegmentationDataset
from hidiff.data.transforms import normalize, resize_pair


@pytest.fixture
def kvasir_small(kvasir_like):
    return get_reader("kvasir-seg").open(kvasir_like(4))


def test_eval_items_are_resized_and_normalised_without_augmentation(kvasir_small):
    info, cases = kvasir_small
    data = SegmentationDataset(cases, info, train=False, size=16)
    item = data[1]
    assert set(item) == {"image", "mask", "case_id"} and item["case_id"] == "case1"
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.float32
    image, mask = resize_pair(*load_case(cases[1], info), 16)
    expected = np.moveaxis(normalize(image, info.mean, info.std), -1, 0)
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    np.testing.assert_array_equal(item["mask"].numpy()[0], mask)
    data.set_epoch(5)
    np.testing.assert_array_equal(data[1]["image"].numpy(), expected)


def test_train_items_are_deterministic_per_seed_epoch_index(kvasir_small):
    info, cases = kvasir_small
    a = SegmentationDataset(cases, info, train=True, size=16, seed=3)
    b = SegmentationDataset(cases, info, train=True, size=16, seed=3, cache=True)
    for index in (2, 0, 2):  # order and caching do not matter
        assert torch.equal(a[index]["image"], b[index]["image"])
        assert torch.equal(a[index]["mask"], b[index]["mask"])
    first = [a[i]["image"] for i in range(len(a))]
    a.set_epoch(1)
    assert any(not torch.equal(x, a[i]["image"]) for i, x in enumerate(first))
    c = SegmentationDataset(cases, info, train=True, size=16, seed=4)
    assert any(not torch.equal(x, c[i]["image"]) for i, x in enumerate(first))
    masks = torch.stack([a[i]["mask"] for i in range(len(a))])
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}


def test_dataloader_batches(kvasir_small):
    info, cases = kvasir_small
    loader = torch.utils.data.DataLoader(
        SegmentationDataset(cases, info, train=True, size=16), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 1, 16, 16)
    assert batch["case_id"] == ["case0", "case1"]


def test_multiclass_masks_are_one_hot(generic_root, synth):
    mask = (synth.blob() > 0).astype(np.uint8)
    mask[-2:, -2:] = 2
    root = generic_root({"background": 0, "a": 1, "b": 2}, [mask])
    info, cases = get_reader("generic").open(root)
    item = SegmentationDataset(cases, info, train=True, size=synth.H)[0]
    assert item["mask"].shape == (3, synth.H, synth.H)
    assert torch.all(item["mask"].sum(0) == 1)


def test_tile_policy_crops_for_training_and_keeps_native_size_for_eval(drive_root, synth):
    info, cases = get_reader("drive").open(drive_root)
    info = info.replace(tile=16, overlap=4)
    train_item = SegmentationDataset(cases, info, train=True)[0]
    assert train_item["image"].shape == (3, 16, 16) and train_item["mask"].shape == (1, 16, 16)
    eval_item = SegmentationDataset(cases, info, train=False)[0]
    assert eval_item["image"].shape == (3, synth.H, synth.W)


@pytest.mark.data
def test_real_items(kvasir_root, chase_root):
    info, cases = get_reader("kvasir-seg").open(kvasir_root)
    test_cases = load_split("kvasir-seg").select(cases, "test")[:1]
    item = SegmentationDataset(test_cases, info, train=True, size=64)[0]
    assert item["image"].shape == (3, 64, 64) and 0 < item["mask"].mean() < 1
    info, cases = get_reader("chase-db1").open(chase_root)
    item = SegmentationDataset(cases[:1], info, train=True, crop=128)[0]
    assert item["image"].shape == (3, 128, 128) and item["mask"].shape == (1, 128, 128)
