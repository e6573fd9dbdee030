"""``torchrun --nproc_per_node=2 -m hidiff.training`` (gloo, CPU): a valid model folder, and
parameters identical on both ranks (per-rank digests logged at every checkpoint)."""

from __future__ import annotations

import pytest
import torch

from hidiff.checkpoint import load_checkpoint
from hidiff.training import load_model_dir
from hidiff.training.batches import BatchPlan
from hidiff.training.distributed import parameter_digest
from hidiff.training.train_log import read_log

pytestmark = pytest.mark.data


def test_torchrun_two_processes(kvasir_root, tmp_path, cli):
    out = tmp_path / "ddp"
    run = ("--checkpoint-every", "2", "--limit-cases", "8", "--batch-size", "2", "--log-every",
           "1", "--pretrain-steps", "1", "--fp-twin")
    proc = cli.torchrun(2, cli.args(kvasir_root, out, "--max-steps", "4", *run))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert load_model_dir(out).step == 4
    seg_at_4 = load_checkpoint(out / "checkpoint.pt")["segmentor"]
    # resume under torchrun too (per-rank RNG states come back from the checkpoint), going on
    # with the refiner alone (the ranks must agree on the phase)
    proc = cli.torchrun(2, cli.args(kvasir_root, out, "--max-steps", "5", "--resume",
                                    "--refine-after-steps", "4", *run))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    model = load_model_dir(out)
    assert model.step == 5 and model.refiner_fp is not None
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not (ckpt["rng"][0]["diffusion"] == ckpt["rng"][1]["diffusion"]).all()  # per rank

    records = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in records] == ["pretrain", "alternate", "alternate", "alternate",
                                             "refine"]
    assert all(torch.equal(v, ckpt["segmentor"][k]) for k, v in seg_at_4.items())
    digests = {r["step"]: r["param_sha256_by_rank"] for r in records
               if "param_sha256_by_rank" in r}
    assert sorted(digests) == [2, 4, 5]
    for step, per_rank in digests.items():
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], step
    # the saved parameters are the ones both ranks held
    assert parameter_digest(model.segmentor, model.refiner, model.refiner_fp) == digests[5][0]


def test_ranks_read_disjoint_shards():
    plans = [BatchPlan(num_cases=11, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        batches = [p.epoch_batches(epoch) for p in plans]
        seen = [sorted(i for b in bs for i in b) for bs in batches]
        assert len(seen[0]) == len(seen[1]) == 4  # 5 per shard, 2 batches of 2
        assert not set(seen[0]) & set(seen[1])
    assert plans[0].epoch_batches(0) != plans[0].epoch_batches(1)  # reshuffled each epoch
