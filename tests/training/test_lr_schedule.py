"""The segmentor's learning-rate schedule: the formula (no data), then a short real run whose
logged learning rates follow it and whose resume continues it exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hidiff.checkpoint import load_checkpoint
from hidiff.training import train
from hidiff.training.lr_schedule import lr_factor, segmentor_ends
from hidiff.training.train_log import read_log


def test_cosine_runs_from_one_to_zero_over_the_segmentor_span():
    kw = dict(elapsed_s=0.0, end_steps=8, end_s=None)
    assert lr_factor("cosine", step=0, **kw) == 1.0
    assert lr_factor("cosine", step=4, **kw) == 0.5
    assert lr_factor("cosine", step=8, **kw) == 0.0
    assert lr_factor("cosine", step=20, **kw) == 0.0  # past the end (a later phase): stays 0
    assert lr_factor("cosine", step=2, **kw) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_the_further_of_the_two_clocks_decides():
    # step 1 of 10 (0.1) but 90 of 120 seconds (0.75): the time budget ends first
    f = lr_factor("cosine", step=1, elapsed_s=90.0, end_steps=10, end_s=120.0)
    assert f == pytest.approx((1 + math.cos(0.75 * math.pi)) / 2)
    assert lr_factor("cosine", step=0, elapsed_s=0.0, end_steps=None, end_s=None) == 1.0


def test_constant_is_one_and_unknown_names_list_the_allowed_values():
    assert lr_factor("constant", step=7, elapsed_s=1e9, end_steps=8, end_s=1.0) == 1.0
    with pytest.raises(ValueError, match="one of constant, cosine; got 'step'"):
        lr_factor("step", step=0, elapsed_s=0.0, end_steps=8, end_s=None)


@given(a=st.integers(0, 300), b=st.integers(0, 300), end=st.integers(1, 200),
       t=st.floats(0.0, 1e4), end_s=st.one_of(st.none(), st.floats(1e-3, 1e4)))
def test_cosine_is_in_zero_one_and_never_rises(a, b, end, t, end_s):
    lo, hi = sorted((a, b))
    f_lo = lr_factor("cosine", step=lo, elapsed_s=t, end_steps=end, end_s=end_s)
    f_hi = lr_factor("cosine", step=hi, elapsed_s=t, end_steps=end, end_s=end_s)
    assert 0.0 <= f_hi <= f_lo <= 1.0


def test_the_segmentor_stops_training_at_the_first_end():
    assert segmentor_ends(max_steps=100, max_minutes=None, refine_after_steps=60,
                          refine_after_minutes=None) == (60, None)
    # every end counts the whole run (resumed time included), so a resume does not move it
    assert segmentor_ends(max_steps=None, max_minutes=20.0, refine_after_steps=None,
                          refine_after_minutes=None) == (None, 1200.0)
    assert segmentor_ends(max_steps=None, max_minutes=20.0, refine_after_steps=None,
                          refine_after_minutes=16.0) == (None, 960.0)
    assert segmentor_ends(max_steps=None, max_minutes=None, refine_after_steps=None,
                          refine_after_minutes=None) == (None, None)


RUN = dict(dataset="kvasir-seg", preset="tiny", batch_size=4, limit_cases=8, pretrain_steps=1,
           seed=3, log_every=1, progress=False, lr=1e-3, segmentor_schedule="cosine")


@pytest.mark.data
def test_a_run_logs_the_annealed_rate_and_a_resume_stretches_it(kvasir_root, tmp_path,
                                                                 one_thread):
    """Steps 1..3 train the segmentor (pre-training, then alternating), steps 4..5 the refiner
    alone: the segmentor's rate of step k is lr * (1 + cos(pi (k - 1) / 3)) / 2. A run stopped
    at max_steps=2 annealed to 0 at step 2; resumed with a later end, the rest of the schedule
    is recomputed towards the new end (it is a function of the step and the ends given)."""
    train(data=kvasir_root, out=tmp_path / "a", max_steps=5, refine_after_steps=3,
          checkpoint_every=100, **RUN)
    log = read_log(tmp_path / "a" / "train_log.jsonl")
    assert [r["phase"] for r in log] == ["pretrain", "alternate", "alternate", "refine", "refine"]
    want = [1e-3 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]
    assert [r["lr"] for r in log[:3]] == pytest.approx(want, rel=1e-12, abs=0.0)

    cut = tmp_path / "b"
    train(data=kvasir_root, out=cut, max_steps=2, refine_after_steps=3, checkpoint_every=100,
          **RUN)
    train(data=kvasir_root, out=cut, max_steps=5, refine_after_steps=3, checkpoint_every=100,
          resume=True, **RUN)
    assert load_checkpoint(cut / "checkpoint.pt")["train_args"]["segmentor_schedule"] == "cosine"
    log = read_log(cut / "train_log.jsonl")
    # steps 1-2 annealed over 2 steps, step 3 back on the 3-step schedule at its step 2
    assert [r["lr"] for r in log[:3]] == pytest.approx([1e-3, 5e-4, want[2]], rel=1e-12, abs=0.0)


@pytest.mark.data
def test_a_cosine_run_cut_where_its_segmentor_stops_resumes_exactly(kvasir_root, tmp_path,
                                                                    one_thread):
    """Cut at the segmentor's end (step 3 = refine_after_steps), the ends and so the schedule
    are the same as the uninterrupted run's: the resumed run equals it bit for bit."""
    full = tmp_path / "a"
    train(data=kvasir_root, out=full, max_steps=5, refine_after_steps=3, checkpoint_every=100,
          **RUN)
    cut = tmp_path / "b"
    train(data=kvasir_root, out=cut, max_steps=3, refine_after_steps=3, checkpoint_every=100,
          **RUN)
    train(data=kvasir_root, out=cut, max_steps=5, refine_after_steps=3, checkpoint_every=100,
          resume=True, **RUN)
    a, b = (load_checkpoint(p / "checkpoint.pt") for p in (full, cut))
    for name in ("segmentor", "refiner"):
        for key, tensor in a[name].items():
            assert tensor.equal(b[name][key]), f"{name}.{key}"
    assert a["optimizers"]["segmentor"]["param_groups"][0]["lr"] == pytest.approx(
        1e-3 * (1 + math.cos(2 * math.pi / 3)) / 2, rel=1e-12, abs=0.0)


@pytest.mark.data
def test_the_minute_budget_counts_the_time_before_a_resume(kvasir_root, tmp_path, one_thread):
    """``max_minutes`` is the run's total training time, as ``max_steps`` is its total
    iterations: resumed with a budget its first session already used up, the run stops at once,
    unchanged (were it this call's clock, it would train ~0.99 of that time again, and an
    interrupted cosine run would anneal towards an end pushed later); raised, it goes on."""
    out = tmp_path / "a"
    train(data=kvasir_root, out=out, max_steps=2, checkpoint_every=100, **RUN)
    used_s = load_checkpoint(out / "checkpoint.pt")["elapsed_s"]
    assert used_s > 0.0
    with pytest.warns(UserWarning, match="nothing to train, the run had already reached its "
                                         "max_minutes"):
        again = train(data=kvasir_root, out=out, max_steps=50,
                      max_minutes=0.99 * used_s / 60.0, checkpoint_every=100, resume=True, **RUN)
    assert (again.stopped_by, again.start_step, again.step) == ("max_minutes", 2, 2)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    more = train(data=kvasir_root, out=out, max_steps=3, max_minutes=60.0, checkpoint_every=100,
                 resume=True, **RUN)
    assert (more.stopped_by, more.step) == ("max_steps", 3)
