"""Checkpoint / resume: a run cut in two (first half in a subprocess) equals the uninterrupted
run exactly; a run killed with SIGKILL resumes from its last checkpoint with a valid folder."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from hidiff.checkpoint import load_checkpoint, save_checkpoint
from hidiff.data import load_split
from hidiff.model_dir import read_config
from hidiff.training import load_model_dir, train
from hidiff.training.train_log import read_log

pytestmark = pytest.mark.data

N = 3  # resume point; 8 cases / batch 4 = 2 batches per epoch, so N is mid-epoch
# These runs are cut by max_steps, which the default cosine schedule anneals to, so a cut run
# would anneal differently from the uninterrupted one by design; the constant rate isolates the
# resume machinery (cosine resumes: tests/training/test_lr_schedule.py).
RUN = dict(dataset="kvasir-seg", preset="tiny", batch_size=4, limit_cases=8, pretrain_steps=1,
           seed=5, log_every=1, progress=False, segmentor_schedule="constant")
CLI_RUN = ("--batch-size", "4", "--limit-cases", "8", "--pretrain-steps", "1", "--seed", "5",
           "--log-every", "1", "--segmentor-schedule", "constant")


def _losses(record):
    return {k: v for k, v in record.items() if k.startswith(("loss_", "grad_norm_"))}


def _assert_same_tensors(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_continues_exactly_like_the_uninterrupted_run(kvasir_root, tmp_path, one_thread,
                                                             cli):
    full = train(data=kvasir_root, out=tmp_path / "a", max_steps=2 * N, checkpoint_every=100,
                 **RUN)
    assert full.step == 2 * N

    cut = tmp_path / "b"
    proc = cli.run(cli.args(kvasir_root, cut, "--max-steps", str(N), "--checkpoint-every",
                            str(N), *CLI_RUN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == N
    resumed = train(data=kvasir_root, out=cut, max_steps=2 * N, checkpoint_every=100,
                    resume=True, **RUN)
    assert (resumed.start_step, resumed.step) == (N, 2 * N)

    log_a, log_b = read_log(tmp_path / "a" / "train_log.jsonl"), read_log(cut / "train_log.jsonl")
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == list(range(1, 2 * N + 1))
    for ra, rb in zip(log_a, log_b, strict=True):
        assert _losses(ra) == _losses(rb), ra["step"]  # exact, step N + 1 included
    assert log_b[N]["step"] == N + 1 and _losses(log_b[N])["loss_refiner"] > 0

    ckpt_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    ckpt_b = load_checkpoint(cut / "checkpoint.pt")
    for key in ("step", "segmentor", "refiner", "refiner_fp", "optimizers"):
        _assert_same_tensors(ckpt_a[key], ckpt_b[key], key)
    _assert_same_tensors(ckpt_a["rng"][0]["diffusion"], ckpt_b["rng"][0]["diffusion"], "rng")


def _wait_for_checkpoint(proc, path, timeout=180.0):
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint:\n{proc.stdout.read()}")
        if time.monotonic() - start > timeout:
            proc.kill()
            pytest.fail("no checkpoint within the time limit")
        time.sleep(0.05)


def test_sigkill_mid_run_then_resume(kvasir_root, tmp_path, one_thread, cli):
    out = tmp_path / "killed"
    proc = cli.popen(cli.args(kvasir_root, out, "--max-steps", "1000", "--checkpoint-every",
                              "2", *CLI_RUN))
    try:
        _wait_for_checkpoint(proc, out / "checkpoint.pt")
        time.sleep(1.0)  # well inside the run: mid-step, maybe mid-write of the next files
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    model = load_model_dir(out)  # every file is complete (atomic writes)
    saved = model.step
    assert saved >= 2 and saved % 2 == 0
    for line in (out / "train_log.jsonl").read_text().splitlines():
        json.loads(line)

    result = train(data=kvasir_root, out=out, max_steps=saved + 2, checkpoint_every=2,
                   resume=True, **RUN)
    assert (result.start_step, result.step) == (saved, saved + 2)
    steps = [r["step"] for r in read_log(out / "train_log.jsonl")]
    assert steps == list(range(1, saved + 3))  # lost steps after the checkpoint were dropped
    assert load_model_dir(out).step == saved + 2
    assert not list(out.glob(".*.tmp"))


def _wait_for_log_steps(proc, log, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.stdout.read()}")
        if log.is_file() and len(log.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    pytest.fail("no log lines within the time limit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_of_the_last_step_then_resume(kvasir_root, tmp_path,
                                                                 one_thread, cli, sig):
    """SIGTERM / Ctrl-C before the first periodic checkpoint: the run stops after its running
    iteration, writes a checkpoint of it, exits 128 + signal naming --resume; resume goes on."""
    out = tmp_path / "stopped"
    proc = cli.popen(cli.args(kvasir_root, out, "--max-steps", "1000", "--checkpoint-every",
                              "1000", *CLI_RUN))
    try:
        _wait_for_log_steps(proc, out / "train_log.jsonl", 3)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)  # stderr goes to stdout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, output
    assert f"stopped by {signal.Signals(sig).name}" in output and "--resume" in output
    saved = load_model_dir(out).step
    steps = [r["step"] for r in read_log(out / "train_log.jsonl")]
    assert saved >= 3 and steps[-1] == saved  # the last completed step, logged and saved

    result = train(data=kvasir_root, out=out, max_steps=saved + 1, resume=True, **RUN)
    assert (result.start_step, result.step) == (saved, saved + 1)


def test_killed_before_the_first_checkpoint_resume_starts_again(kvasir_root, tmp_path,
                                                                one_thread, cli):
    """SIGKILL (no handler runs) before any checkpoint: --resume restarts the folder from step 0
    with a warning instead of sending the user in circles."""
    out = tmp_path / "killed_early"
    proc = cli.popen(cli.args(kvasir_root, out, "--max-steps", "1000", "--checkpoint-every",
                              "1000", *CLI_RUN))
    try:
        _wait_for_log_steps(proc, out / "train_log.jsonl", 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "checkpoint.pt").exists() and (out / "config.json").is_file()
    with pytest.warns(UserWarning, match="no checkpoint .* starts it again from step 0"):
        result = train(data=kvasir_root, out=out, max_steps=2, resume=True, **RUN)
    assert (result.start_step, result.step) == (0, 2)
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2]


def test_refiner_holdout_resumes_exactly_and_keeps_its_cases_from_the_segmentor(
        kvasir_root, tmp_path, one_thread):
    run = {**RUN, "refiner_holdout": 0.25}
    full = train(data=kvasir_root, out=tmp_path / "a", max_steps=2 * N, checkpoint_every=100,
                 **run)
    split = json.loads((tmp_path / "a" / "split.json").read_text())["subsets"]
    first8 = load_split("kvasir-seg")["train"][:8]
    # the last quarter of the 8 cases is the refiner's alone; the segmentor keeps the rest
    assert split["train"] == first8[:6] and split["train_refiner"] == first8[6:]
    assert full.step == 2 * N

    cut = tmp_path / "b"
    train(data=kvasir_root, out=cut, max_steps=N, checkpoint_every=N, **run)
    assert load_checkpoint(cut / "checkpoint.pt")["refiner_steps"] == N - 1  # 1 pretrain step
    resumed = train(data=kvasir_root, out=cut, max_steps=2 * N, checkpoint_every=100,
                    resume=True, **run)
    assert (resumed.start_step, resumed.step) == (N, 2 * N)
    log_a, log_b = read_log(tmp_path / "a" / "train_log.jsonl"), read_log(cut / "train_log.jsonl")
    for ra, rb in zip(log_a, log_b, strict=True):
        assert _losses(ra) == _losses(rb), ra["step"]
    ckpt_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    ckpt_b = load_checkpoint(cut / "checkpoint.pt")
    for key in ("step", "refiner_steps", "segmentor", "refiner", "optimizers"):
        _assert_same_tensors(ckpt_a[key], ckpt_b[key], key)


def test_refine_phase_freezes_the_segmentor_and_can_be_added_on_resume(kvasir_root, tmp_path,
                                                                       one_thread):
    """``refine_after_steps=N``: from step N + 1 on only the refiner trains. A run that stopped
    at N without it and is resumed with it equals the run that had it from the start; a later
    resume that does not give it keeps the stored value."""
    full = train(data=kvasir_root, out=tmp_path / "a", max_steps=2 * N, checkpoint_every=N,
                 refine_after_steps=N, **RUN)
    assert full.step == 2 * N
    log_a = read_log(tmp_path / "a" / "train_log.jsonl")
    assert [r["phase"] for r in log_a] == ["pretrain"] + ["alternate"] * (N - 1) + ["refine"] * N
    assert all("loss_segmentor" not in r and r["loss_refiner"] > 0 for r in log_a[N:])
    ckpt_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert ckpt_a["refiner_steps"] == 2 * N - 1

    cut = tmp_path / "b"
    train(data=kvasir_root, out=cut, max_steps=N, checkpoint_every=N, **RUN)
    seg_at_n = load_checkpoint(cut / "checkpoint.pt")["segmentor"]
    with pytest.warns(UserWarning, match=rf"refine_after_steps={N} replaces the stored "
                                         rf"refine_after_steps=None from step {N} on"):
        train(data=kvasir_root, out=cut, max_steps=2 * N - 1, checkpoint_every=100,
              resume=True, refine_after_steps=N, **RUN)
    train(data=kvasir_root, out=cut, max_steps=2 * N, checkpoint_every=100, resume=True, **RUN)
    ckpt_b = load_checkpoint(cut / "checkpoint.pt")
    assert ckpt_b["train_args"]["refine_after_steps"] == N  # kept by the resume without it
    _assert_same_tensors(seg_at_n, ckpt_b["segmentor"], "segmentor frozen after N")
    for key in ("step", "refiner_steps", "segmentor", "refiner", "optimizers"):
        _assert_same_tensors(ckpt_a[key], ckpt_b[key], key)
    log_b = read_log(cut / "train_log.jsonl")
    for ra, rb in zip(log_a, log_b, strict=True):
        assert _losses(ra) == _losses(rb) and ra["phase"] == rb["phase"], ra["step"]


def test_resume_with_refine_after_minutes_zero_goes_on_with_the_segmentor_frozen(
        kvasir_root, tmp_path, one_thread):
    """The README's recipe: the same options (pre-training included, which a new run would
    check the refine start against) plus ``refine_after_minutes=0`` on resume: every further
    iteration trains the refiner alone, through the minutes path of the phase."""
    out = tmp_path / "run"
    train(data=kvasir_root, out=out, max_steps=N, checkpoint_every=N, **RUN)
    seg = load_checkpoint(out / "checkpoint.pt")["segmentor"]
    with pytest.warns(UserWarning, match="refine_after_minutes=0 replaces"):
        train(data=kvasir_root, out=out, max_steps=N + 2, resume=True, refine_after_minutes=0,
              **RUN)
    assert [r["phase"] for r in read_log(out / "train_log.jsonl")][N:] == ["refine"] * 2
    _assert_same_tensors(seg, load_checkpoint(out / "checkpoint.pt")["segmentor"], "segmentor")


def test_folder_from_before_lambda_y0_was_recorded_resumes_without_it(kvasir_root, tmp_path,
                                                                      one_thread):
    """A checkpoint whose train_args predate ``lambda_y0`` trained without the y0 term: resuming
    it with today's default keeps it off (with a warning) instead of changing the trajectory."""
    out = tmp_path / "old"
    train(data=kvasir_root, out=out, max_steps=N, checkpoint_every=N, lambda_y0=0.0, **RUN)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    del ckpt["train_args"]["lambda_y0"]
    save_checkpoint(out / "checkpoint.pt", ckpt)
    # today's default (not given here): the warning does not claim it was given
    with pytest.warns(UserWarning, match=r"lambda_y0=1\.0 is not used \(given, or today's "
                                         r"default\); the run continues with its stored "
                                         r"lambda_y0=0\.0"):
        train(data=kvasir_root, out=out, max_steps=N + 1, resume=True, **RUN)
    assert load_checkpoint(out / "checkpoint.pt")["train_args"]["lambda_y0"] == 0.0


def test_resume_warns_that_a_given_value_is_ignored(kvasir_root, tmp_path, one_thread):
    """A value given on resume that differs from the stored one is named as ignored; today's
    defaults (not given) are not."""
    out = tmp_path / "run"
    train(data=kvasir_root, out=out, max_steps=N, checkpoint_every=N, lr=1e-3, **RUN)
    with pytest.warns(UserWarning) as caught:
        train(data=kvasir_root, out=out, max_steps=N + 1, resume=True, lr=5e-4, **RUN)
    messages = [str(w.message) for w in caught]
    assert any("lr=0.0005 ignored, the run continues with its stored lr=0.001" in m
               for m in messages), messages
    assert not any("ignored" in m and "lr=" not in m for m in messages), messages
    with pytest.warns(UserWarning, match=r"lr=0\.0001 is not used \(given, or today's default\)"
                                         r"; the run continues with its stored lr=0\.001"):
        train(data=kvasir_root, out=out, max_steps=N + 2, resume=True, **RUN)


def test_resume_keeps_the_models_offset_and_says_so(kvasir_root, tmp_path, one_thread):
    """``offset`` is part of the model (config.json), not of the trajectory: a resume keeps the
    stored form and names the given one as ignored."""
    out = tmp_path / "plain"
    train(data=kvasir_root, out=out, max_steps=N, checkpoint_every=N, offset="none", **RUN)
    with pytest.warns(UserWarning, match=r"offset='bayes' is not used \(given, or today's "
                                         r"default\); the run continues with its stored "
                                         r"offset='none' \(config\.json\)"):
        train(data=kvasir_root, out=out, max_steps=N + 1, resume=True, **RUN)
    assert read_config(out).refiner.offset == "none"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == N + 1
