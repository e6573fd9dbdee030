"""Small parts of the training package, without data: data order, atomic writes, logs, plot."""

from __future__ import annotations

import json

import pytest
import torch

from hidiff.model_dir import atomic_write, atomic_write_text, remove_stale_temp_files
from hidiff.training.batches import BatchPlan, iterate_batches
from hidiff.training.plot import plot_training_curve
from hidiff.training.train_log import TrainLog, read_log


class _Items(torch.utils.data.Dataset):
    """Item ``i`` is ``(epoch, i)``: shows which case of which epoch was read."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([self.epoch, i])


def _take(iterator, count):
    return [next(iterator)[1].tolist() for _ in range(count)]


def test_data_position_is_a_function_of_the_step():
    plan = BatchPlan(num_cases=7, batch_size=3, seed=11)
    assert plan.batches_per_epoch == 2 and plan.position(5) == (2, 1)
    straight = _take(iterate_batches(_Items(7), plan, 0), 7)
    for start in (1, 2, 5):
        assert _take(iterate_batches(_Items(7), plan, start), 7 - start) == straight[start:]
    epochs = [{row[0] for row in batch} for batch in straight]
    assert epochs == [{0}, {0}, {1}, {1}, {2}, {2}, {3}]
    first_epoch = [row[1] for batch in straight[:2] for row in batch]
    assert len(set(first_epoch)) == 6  # no case twice in an epoch (one dropped: 7 = 2 * 3 + 1)


def test_shard_smaller_than_a_batch_is_one_batch():
    plan = BatchPlan(num_cases=3, batch_size=8, seed=0)
    assert plan.epoch_batches(0) and sorted(plan.epoch_batches(0)[0]) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        BatchPlan(num_cases=3, batch_size=1, seed=0, world_size=4)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "file.json"
    atomic_write_text(path, "old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]
    (tmp_path / ".checkpoint.pt.abc.tmp").write_bytes(b"left by a killed writer")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".checkpoint.pt.abc.tmp"]


def test_train_log_resume_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "train_log.jsonl"
    log = TrainLog(path)
    for step in (1, 2, 3, 4):
        log.append({"step": step, "loss_seg": 1.0 / step, "val_dice": float("nan")})
    assert [r["step"] for r in read_log(path)] == [1, 2, 3, 4]
    assert read_log(path)[0]["val_dice"] is None  # NaN is not JSON
    resumed = TrainLog.resume(path, step=2)
    assert [r["step"] for r in resumed.records] == [1, 2]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert resumed.last("loss_seg") == 0.5


def test_training_curve_png(tmp_path):
    records = [{"step": 0, "val_dice": 0.2}] + [
        {"step": s, "loss_refiner": 1 / s, "loss_refiner_fp": 1.1 / s, "loss_seg": 2 / s,
         "loss_seg_diff": 0.5 / s, "loss_segmentor": 2.5 / s} for s in range(1, 20)]
    path = plot_training_curve(records, tmp_path / "training_curve.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_curve([], tmp_path / "none.png") is None
