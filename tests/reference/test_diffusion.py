"""Forward process, posterior and steps against brute-force probability (method §3-5)."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bits, probs, respaced_schedules, schedule_and_t, schedules

from reference import (
    ddim_mean,
    flip_probability,
    q_mean,
    q_posterior_mean,
    q_sample,
    q_sample_flip,
    q_step_mean,
)


def bern(value, mean):
    """Bernoulli pmf B(value; mean) for value in {0, 1}."""
    return mean if value == 1 else 1 - mean


def brute_force_posterior(y_t, y0, p, t, s):
    """P(y_{t-1} = 1 | y_t, p) under y0 ~ B(y0) (binary y0 is the point mass), by enumeration.

    Computed in exact rational arithmetic (every float converts exactly to a Fraction), so the
    oracle has no rounding of its own: near-saturated priors (1 - 1e-12) would otherwise lose
    digits to cancellation in 1 - mean.
    """
    y_t, y0, p = Fraction(y_t), Fraction(y0), Fraction(p)
    alpha, abar_prev = Fraction(s.alphas[t]), Fraction(s.alphas_cumprod[t - 1])
    num = den = Fraction(0)
    for y0_val in (0, 1):
        w0 = bern(y0_val, y0)
        for v in (0, 1):
            prior_v = bern(v, abar_prev * y0_val + (1 - abar_prev) * p)
            lik = bern(int(y_t), alpha * v + (1 - alpha) * p)
            joint = w0 * prior_v * lik
            den += joint
            num += joint * v
    return float(num / den) if den > 0 else None


@settings(max_examples=400, deadline=None)
@given(schedule_and_t(), bits(), bits(), probs())
def test_posterior_equals_brute_force_bayes(sched_t, y_t, y0, p):
    s, t = sched_t
    mu = q_posterior_mean(y_t, y0, p, t, s)
    assert np.all(np.isfinite(mu)) and np.all((mu >= 0) & (mu <= 1))
    for i in range(len(y_t)):
        want = brute_force_posterior(y_t[i], y0[i], p[i], t, s)
        if want is not None:  # configurations of probability 0 are documented as 0.5
            # float64 formula vs exact rationals: rtol covers a few ulps of rounding; atol covers
            # products of probabilities like p^2 with p = 1e-300 that underflow float64 to 0
            np.testing.assert_allclose(mu[i], want, rtol=1e-12, atol=1e-15)
        else:
            assert mu[i] == 0.5


@settings(max_examples=300, deadline=None)
@given(schedule_and_t(), bits(), probs(), probs())
def test_posterior_with_continuous_y0_marginalises_y0(sched_t, y_t, y0_hat, p):
    # The formula is linear in y0, so y0_hat in [0, 1] equals y0 ~ B(y0_hat) (method §4).
    s, t = sched_t
    mu = q_posterior_mean(y_t, y0_hat, p, t, s)
    assert np.all(np.isfinite(mu))
    for i in range(len(y_t)):
        want = brute_force_posterior(y_t[i], y0_hat[i], p[i], t, s)
        if want is not None:
            np.testing.assert_allclose(mu[i], want, rtol=1e-12, atol=1e-15)  # as above


@settings(max_examples=300, deadline=None)
@given(schedule_and_t(), probs(), probs(), probs())
def test_posterior_is_nan_free_on_all_of_0_1(sched_t, y_t, y0, p):
    mu = q_posterior_mean(y_t, y0, p, sched_t[1], sched_t[0])
    assert np.all(np.isfinite(mu)) and np.all((mu >= 0) & (mu <= 1))


def test_posterior_at_t1_recovers_y0():
    # abar_0 = 1: at t = 1 the posterior is y0 itself (no wrap-around of t - 1 to T).
    from reference import make_schedule

    s = make_schedule("cosine", 10)
    y0 = np.array([0.0, 1.0, 0.0, 1.0])
    y_t = np.array([0.0, 0.0, 1.0, 1.0])
    p = np.array([0.3, 0.7, 0.9, 0.1])
    np.testing.assert_allclose(q_posterior_mean(y_t, y0, p, 1, s), y0, atol=1e-15)


@settings(max_examples=300, deadline=None)
@given(schedule_and_t(low=0), probs(), probs())
def test_composing_one_step_kernels_gives_the_closed_form(sched_t, y0, p):
    s, t = sched_t
    mean = y0.copy()  # P(y_0 = 1); for binary or continuous y0 the Bernoulli means compose
    for k in range(1, t + 1):
        mean = q_step_mean(mean, p, k, s)
    np.testing.assert_allclose(mean, q_mean(y0, p, t, s), rtol=1e-9, atol=1e-12)


def _marginal_after_step(step_fn, m_t):
    """P(y_prev = 1) when y_t ~ B(m_t) and y_prev ~ B(step_fn(y_t))."""
    return m_t * step_fn(np.ones_like(m_t)) + (1 - m_t) * step_fn(np.zeros_like(m_t))


@settings(max_examples=300, deadline=None)
@given(schedules(), st.data(), bits(), probs())
def test_ddim_step_preserves_the_marginal(s, data, y0, p):
    t = data.draw(st.integers(1, s.num_steps))
    t_prev = data.draw(st.integers(0, t - 1))
    m_t = q_mean(y0, p, t, s)
    got = _marginal_after_step(lambda y: ddim_mean(y, y0, t, t_prev, s), m_t)
    np.testing.assert_allclose(got, q_mean(y0, p, t_prev, s), rtol=1e-9, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(respaced_schedules(), st.data(), bits(), probs())
def test_ddim_and_ancestral_preserve_the_marginal_on_respaced_chains(s, data, y0, p):
    t = data.draw(st.integers(1, s.num_steps))
    m_t = q_mean(y0, p, t, s)
    want = q_mean(y0, p, t - 1, s)
    got_ddim = _marginal_after_step(lambda y: ddim_mean(y, y0, t, t - 1, s), m_t)
    got_anc = _marginal_after_step(lambda y: q_posterior_mean(y, y0, p, t, s), m_t)
    np.testing.assert_allclose(got_ddim, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_anc, want, rtol=1e-9, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(schedules(), st.data())
def test_ddim_coefficients_form_a_valid_mean_without_clipping(s, data):
    # mean = sigma * y_t + c * y0_hat with sigma, c >= 0 and sigma + c <= 1, so every mean of
    # inputs in [0, 1] lies in [0, 1] before ddim_mean's clip (the clip only absorbs rounding);
    # (y_t, y0_hat) = (1, 1) must give exactly the certain mean 1 and (0, 0) the mean 0.
    t = data.draw(st.integers(1, s.num_steps))
    t_prev = data.draw(st.integers(0, t - 1))
    abar_t, abar_prev = s.alphas_cumprod[t], s.alphas_cumprod[t_prev]
    sigma = (1 - abar_prev) / (1 - abar_t)
    c = abar_prev - sigma * abar_t
    assert sigma >= 0 and c >= -1e-15 and sigma + c <= 1 + 1e-12
    one, zero = np.ones(1), np.zeros(1)
    np.testing.assert_allclose(ddim_mean(one, one, t, t_prev, s), 1.0, atol=1e-12)
    assert ddim_mean(zero, zero, t, t_prev, s)[0] == 0.0
    np.testing.assert_allclose(ddim_mean(one, zero, t, t_prev, s), sigma, atol=1e-15)
    np.testing.assert_allclose(ddim_mean(zero, one, t, t_prev, s), max(c, 0.0), atol=1e-15)


@settings(max_examples=300, deadline=None)
@given(schedule_and_t(low=0), bits(), probs())
def test_flip_map_has_the_distribution_of_q(sched_t, y0, p):
    s, t = sched_t
    f = flip_probability(y0, p, t, s)
    p_one = y0 * (1 - f) + (1 - y0) * f  # P(y0 XOR eps = 1)
    np.testing.assert_allclose(p_one, q_mean(y0, p, t, s), rtol=1e-12, atol=1e-15)


@settings(max_examples=100, deadline=None)
@given(schedule_and_t(low=0), bits((64,)), probs((64,)), st.integers(0, 2**32 - 1))
def test_flip_sample_is_y0_xor_eps_and_mean_sample_uses_u(sched_t, y0, p, seed):
    s, t = sched_t
    u = np.random.default_rng(seed).random(y0.shape)
    y_t, eps = q_sample_flip(y0, p, t, s, u)
    np.testing.assert_array_equal(y_t, np.logical_xor(y0, eps))
    np.testing.assert_array_equal(eps, u < flip_probability(y0, p, t, s))
    np.testing.assert_array_equal(q_sample(y0, p, t, s, u), u < q_mean(y0, p, t, s))


def test_flip_sampling_matches_q_in_distribution():
    # Monte Carlo check of the same identity through actual draws (4 sigma bound).
    from reference import make_schedule

    s = make_schedule("cosine", 10)
    rng = np.random.default_rng(0)
    y0 = np.array([0.0, 1.0, 0.0, 1.0])
    p = np.array([0.2, 0.2, 0.9, 0.9])
    n = 200_000
    for t in (1, 5, 10):
        u = rng.random((n, 4))
        y_t, _ = q_sample_flip(np.broadcast_to(y0, (n, 4)), p, t, s, u)
        want = q_mean(y0, p, t, s)
        sigma = np.sqrt(want * (1 - want) / n) + 1e-12
        assert np.all(np.abs(y_t.mean(0) - want) < 4 * sigma + 1e-9)


def test_q_mean_reaches_the_prior_at_T_for_linear_abar():
    from reference import make_schedule

    p = np.array([0.0, 0.25, 1.0])
    for num_steps in (1, 10, 1000):
        s = make_schedule("linear_abar", num_steps)
        np.testing.assert_array_equal(q_mean(np.array([1.0, 0.0, 0.0]), p, num_steps, s), p)
        d = [np.abs(q_mean(np.ones(3), p, t, s) - p).max() for t in range(num_steps + 1)]
        assert all(b <= a for a, b in zip(d, d[1:], strict=False))
