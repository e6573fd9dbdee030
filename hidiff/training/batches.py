"""The training data order: a pure function of (seed, epoch, rank), so the position is the step.

Each epoch permutes the training cases with a generator seeded by ``(seed, epoch)`` (the same on
every rank); rank ``r`` of ``W`` takes every W-th case of the permutation (equal shard sizes,
``len // W``) and cuts its shard into ``batch_size`` batches, dropping the incomplete last one
(unless the shard is smaller than one batch: then the whole shard is the batch). Iteration ``s``
(0-based) therefore reads batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``;
resuming at a step needs no loader state. Augmentation draws are the dataset's own, seeded by
``(seed, epoch, case index)`` (:class:`hidiff.data.torch_dataset.SegmentationDataset`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

__all__ = ["BatchPlan", "iterate_batches"]

_ORDER_TAG = 0x0D0E  # keeps the order stream apart from other uses of the same seed


@dataclass(frozen=True)
class BatchPlan:
    num_cases: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.num_cases < self.world_size:
            raise ValueError(f"{self.num_cases} training case(s) cannot be shared by "
                             f"{self.world_size} processes")

    @property
    def shard_size(self) -> int:
        return self.num_cases // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.shard_size // self.batch_size)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index in the epoch)`` of 0-based iteration ``step``."""
        return divmod(int(step), self.batches_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _ORDER_TAG, int(epoch)])
        return rng.permutation(self.num_cases)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        shard = self.epoch_order(epoch)[self.rank::self.world_size][: self.shard_size]
        size = min(self.batch_size, len(shard))
        return [shard[i * size:(i + 1) * size].tolist() for i in range(self.batches_per_epoch)]


def iterate_batches(dataset: Any, plan: BatchPlan, start_step: int, *,
                    num_workers: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless ``(epoch, batch)`` from iteration ``start_step`` on.

    ``dataset`` needs ``set_epoch(epoch)``; one DataLoader per epoch (so workers see the epoch).
    """
    epoch, offset = plan.position(start_step)
    while True:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=plan.epoch_batches(epoch)[offset:],
                            num_workers=num_workers)
        for batch in loader:
            yield epoch, batch
        epoch, offset = epoch + 1, 0
