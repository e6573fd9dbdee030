"""The torch ``Dataset`` over decoded cases (the only torch-dependent module of hidiff.data).

Each item is ``{"image": (C, H, W) float32 normalised, "mask": (K, H, W) float32, "case_id"}``.
Preprocessing follows ``info.policy``:

- ``"resize"``: image and mask resized to ``size`` (default ``info.size``) square.
- ``"tile"``: training items are random ``crop`` x ``crop`` patches (default ``info.tile``) at
  native resolution; evaluation items are whole images at native resolution (batch them one at a
  time, or with equal sizes, and predict them with ``reference.images``).

Augmentation (:func:`hidiff.data.transforms.augment`) only when ``train=True``. Every item draws
from its own generator seeded by ``(seed, epoch, index)``, so results do not depend on worker
processes or on the order items are fetched. Call :meth:`set_epoch` before each epoch's iterator
is created (with ``persistent_workers`` the workers would keep the old epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hidiff.data.info import Case, DatasetInfo
from hidiff.data.io import load_case
from hidiff.data.transforms import (
    augment,
    mask_to_channels,
    normalize,
    random_crop,
    resize_pair,
    to_chw,
)


class SegmentationDataset(Dataset):
    """Cases of one dataset as normalised tensors; see the module docstring."""

    def __init__(self, cases: Sequence[Case], info: DatasetInfo, *, train: bool,
                 size: int | None = None, crop: int | None = None, seed: int = 0,
                 cache: bool = False, augment_kwargs: dict[str, Any] | None = None) -> None:
        if not cases:
            raise ValueError("SegmentationDataset needs at least one case")
        self.cases = list(cases)
        self.info = info
        self.train = bool(train)
        self.size = int(size if size is not None else info.size)
        self.crop = int(crop if crop is not None else info.tile)
        self.seed = int(seed)
        self.epoch = 0
        self.augment_kwargs = dict(augment_kwargs or {})
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws the items use."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _base(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (and, for the resize policy, resized) pair before any randomness."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image, mask = load_case(self.cases[index], self.info)
        if self.info.policy == "resize":
            image, mask = resize_pair(image, mask, self.size)
        if self._cache is not None:
            self._cache[index] = (image, mask)
        return image, mask

    def load_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as numpy arrays: image HWC in [0, 1] (not normalised), mask HW."""
        if not 0 <= index < len(self.cases):
            raise IndexError(f"index {index} out of range for {len(self.cases)} cases")
        image, mask = self._base(index)
        if self.train:
            rng = self.rng(index)
            if self.info.policy == "tile":
                image, mask = random_crop(image, mask, self.crop, rng)
            image, mask = augment(image, mask, rng, **self.augment_kwargs)
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.load_arrays(index)
        image = to_chw(normalize(image, self.info.mean, self.info.std))
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask_to_channels(mask, self.info.num_classes)),
            "case_id": self.cases[index].case_id,
        }
