"""Schedules: valid betas for every T, abar_0 = 1, respacing (method §2)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import schedules

from reference import SCHEDULE_NAMES, make_schedule, respace, spaced_steps


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_has_betas_in_0_1_for_T_up_to_1000(name):
    # The official `linear` schedule gives beta > 1 at T = 10 and crashes; none of ours can.
    for num_steps in range(1, 1001):
        s = make_schedule(name, num_steps)
        assert s.betas[0] == 0 and s.alphas[0] == 1 and s.alphas_cumprod[0] == 1
        assert np.all(s.betas[1:] > 0) and np.all(s.betas[1:] <= 1), (name, num_steps)
        assert np.all(np.diff(s.alphas_cumprod) < 0)
        np.testing.assert_array_equal(s.alphas_cumprod, np.cumprod(s.alphas))


def test_linear_abar_is_exactly_linear_and_reaches_the_prior():
    s = make_schedule("linear_abar", 10)
    np.testing.assert_allclose(s.alphas_cumprod, 1 - np.arange(11) / 10, atol=1e-15)
    assert s.alphas_cumprod[-1] == 0.0


def test_cosine_matches_its_formula_before_clipping():
    s = make_schedule("cosine", 1000)
    tau = np.arange(1001) / 1000
    g = np.cos((tau + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = g / g[0]
    unclipped = s.betas < 0.999
    np.testing.assert_allclose(
        s.alphas_cumprod[:-1][unclipped[:-1]], abar[:-1][unclipped[:-1]], rtol=1e-10
    )


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="cosine, linear_abar"):
        make_schedule("linear", 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            make_schedule("cosine", bad)


def test_schedule_arrays_are_read_only():
    s = make_schedule("cosine", 10)
    with pytest.raises(ValueError):
        s.betas[1] = 0.5


@settings(max_examples=200, deadline=None)
@given(schedules(), st.data())
def test_respacing_keeps_abar_and_chains_betas(sched, data):
    t_max = sched.num_steps
    kept = sorted(data.draw(st.sets(st.integers(1, t_max))) | {t_max})
    r = respace(sched, kept)
    assert r.num_steps == len(kept)
    np.testing.assert_array_equal(r.timesteps, [0, *kept])
    np.testing.assert_array_equal(r.alphas_cumprod, sched.alphas_cumprod[[0, *kept]])
    prev = sched.alphas_cumprod[[0, *kept[:-1]]]
    np.testing.assert_allclose(r.betas[1:], 1 - sched.alphas_cumprod[kept] / prev, rtol=1e-12)
    assert np.all(r.betas[1:] > 0) and np.all(r.betas[1:] <= 1)
    assert r.original_num_steps == t_max


def test_respacing_all_steps_is_the_identity():
    s = make_schedule("cosine", 10)
    r = respace(s, range(1, 11))
    np.testing.assert_allclose(r.betas, s.betas, rtol=1e-12)
    np.testing.assert_array_equal(r.timesteps, s.timesteps)


@pytest.mark.parametrize("steps", [[1, 2], [3, 2, 10], [0, 10], [5, 5, 10], []])
def test_respacing_rejects_bad_step_sets(steps):
    with pytest.raises(ValueError):
        respace(make_schedule("cosine", 10), steps)


def test_respacing_twice_is_refused():
    r = respace(make_schedule("cosine", 10), [5, 10])
    with pytest.raises(ValueError, match="un-respaced"):
        respace(r, [2])


@pytest.mark.parametrize("num_steps", [1, 2, 10, 17, 1000])
def test_spaced_steps(num_steps):
    for count in range(1, min(num_steps, 40) + 1):
        steps = spaced_steps(num_steps, count)
        assert len(steps) == count and steps[-1] == num_steps
        assert steps == sorted(set(steps)) and steps[0] >= 1
