"""A short real training run on Kvasir-SEG: losses fall, the segmentor beats its untrained self,
and the model folder is complete and loads on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hidiff.data import open_dataset
from hidiff.data.torch_dataset import SegmentationDataset
from hidiff.training import FORMAT_VERSION, build_networks, load_model_dir, train
from hidiff.training.validation import segmentor_dice

pytestmark = pytest.mark.data

FILES = ("hidiff_model.json", "config.json", "dataset.json", "split.json", "checkpoint.pt",
         "train_log.jsonl", "training_curve.png")


def _mean(records, key, which):
    values = [r[key] for r in records if r.get(key) is not None]
    assert len(values) >= 8, key
    return float(np.mean(values[:4] if which == "first" else values[-4:]))


def test_short_run_learns_and_writes_a_complete_model_folder(kvasir_root, tmp_path, one_thread):
    out = tmp_path / "model"
    # 160 segmentor pre-training steps (cheap) then 24 alternating iterations, with a high lr:
    # the tiny U-Net (64 x 64) needs ~100 steps before any pixel crosses p = 0.5 (Dice > 0).
    # offset "none": from an all-1/2 start every refiner loss has far to fall, which is what the
    # learning asserts below measure; the default "bayes" offset starts at the segmentor's
    # estimate (its losses start low), checked in test_bayes_offset_starts_at_the_segmentor.
    # self_align 0: with it the refiner's inputs move as the refiner learns (its own estimates),
    # so its loss is not a fixed target to fall; self-alignment is checked on its own in
    # tests/training/test_steps.py. lambda_y0 0 for the same reason: its cross-entropy on y0_hat
    # starts high, is part of loss_seg_diff itself and moves the refiner in its own direction over
    # 24 iterations; it is checked in test_steps.py. A constant segmentor rate: annealed, its
    # mean rate halves and 184 steps no longer take the tiny U-Net past p = 0.5 (the schedule is
    # checked in tests/training/test_lr_schedule.py)
    result = train(dataset="kvasir-seg", data=kvasir_root, preset="tiny", out=out, offset="none",
                   self_align=0.0, lambda_y0=0.0, segmentor_schedule="constant",
                   max_steps=184, pretrain_steps=160, lr=1e-2, batch_size=4, limit_cases=8,
                   log_every=1, checkpoint_every=100, val_every=92, progress=False,
                   train_fp_twin=True)
    assert result.step == 184 and result.stopped_by == "max_steps"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 184
    alternate = [r for r in records if r.get("phase") == "alternate"]
    assert {r["phase"] for r in records if "phase" in r} == {"pretrain", "alternate"}
    # the segmentor loss over the whole run, the refiner losses over the alternating phase
    assert _mean(records, "loss_seg", "last") < _mean(records, "loss_seg", "first") - 0.2
    for key in ("loss_refiner", "loss_refiner_fp", "loss_seg_diff"):
        assert _mean(alternate, key, "last") < 0.8 * _mean(alternate, key, "first"), key
    val = [(r["step"], r["val_dice"]) for r in records if "val_dice" in r]
    assert [s for s, _ in val] == [0, 92, 184] and result.val_dice == val[-1][1]

    header = json.loads((out / "hidiff_model.json").read_text())
    assert header["format"] == "hidiff-model" and header["format_version"] == FORMAT_VERSION
    assert "commit" in header and "created" in header
    split = json.loads((out / "split.json").read_text())
    assert len(split["subsets"]["train"]) == 8 and split["counts"]["test"] == 100
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = load_model_dir(out)
    assert model.step == 184 and model.refiner_fp is not None
    assert not model.segmentor.training and not model.refiner.training
    assert model.dataset_info.size == model.config.image_size == 64
    assert model.train_args["lambda_diff"] == 1.0 and model.train_args["batch_size"] == 4

    # Dice of the segmentor alone on its training cases: trained vs freshly initialised
    _, cases = open_dataset("kvasir-seg", kvasir_root)
    evaluation = SegmentationDataset(model.split.select(cases, "train"), model.dataset_info,
                                     train=False)
    torch.manual_seed(0)
    untrained, _, _ = build_networks(model.config, fp_twin=False)
    before, after = segmentor_dice(untrained, evaluation), segmentor_dice(model.segmentor,
                                                                          evaluation)
    assert after > before + 0.1, (before, after)
