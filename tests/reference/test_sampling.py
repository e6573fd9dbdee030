"""The reverse loop and the losses (method §5-6)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bits, probs, respaced_schedules, schedule_and_t

from reference import (
    PROB_EPS,
    bernoulli_kl,
    draw_uniforms,
    final_mask,
    focal_loss,
    kl_bits,
    make_schedule,
    nll_bits,
    q_posterior_mean,
    refiner_loss,
    refiner_loss_terms,
    respace,
    reverse_process,
    y0_from_eps,
)


@settings(max_examples=60, deadline=None)
@given(
    respaced_schedules(max_steps=20),
    st.sampled_from(["ddim", "ancestral"]),
    st.sampled_from(["eps", "y0"]),
    st.integers(0, 2**31 - 1),
)
def test_an_oracle_denoiser_recovers_y0_exactly(s, method, param, seed):
    rng = np.random.default_rng(seed)
    y0 = (rng.random((1, 1, 8, 8)) < 0.4).astype(np.float64)
    prior = rng.random(y0.shape)
    told = []

    def oracle(y_t, step):
        told.append(step)
        return np.abs(y_t - y0) if param == "eps" else y0

    out = reverse_process(
        prior,
        oracle,
        schedule=s,
        uniforms=draw_uniforms(seed, y0.shape, s.num_steps),
        method=method,
        parameterization=param,
    )
    np.testing.assert_array_equal(out.y0_hat, y0)
    # the network is told the ORIGINAL step indices, from T down to the first kept step
    assert told == list(s.timesteps[1:][::-1])
    assert len(out.states) == s.num_steps


def test_reverse_process_is_deterministic_for_a_seed_and_checks_uniform_shapes():
    s = respace(make_schedule("cosine", 10), [4, 7, 10])
    prior = np.full((1, 1, 4, 4), 0.5)

    def net(y_t, step):
        return np.full_like(y_t, 0.3)

    a = reverse_process(prior, net, schedule=s, uniforms=draw_uniforms(7, prior.shape, 3))
    b = reverse_process(prior, net, schedule=s, uniforms=draw_uniforms(7, prior.shape, 3))
    np.testing.assert_array_equal(a.y0_hat, b.y0_hat)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        reverse_process(prior, net, schedule=s, uniforms=draw_uniforms(7, prior.shape, 2))
    with pytest.raises(ValueError, match="allowed: ddim, ancestral"):
        reverse_process(
            prior, net, schedule=s, uniforms=draw_uniforms(7, prior.shape, 3), method="ddpm"
        )


def test_final_mask_binary_and_multiclass():
    prob = np.array([[[[0.2, 0.5, 0.51]]]])
    np.testing.assert_array_equal(final_mask(prob), [[[[0, 0, 1]]]])
    multi = np.array([[[[0.1, 0.6]], [[0.7, 0.2]], [[0.2, 0.2]]]])
    np.testing.assert_array_equal(final_mask(multi), [[[1, 0]]])


@settings(max_examples=300, deadline=None)
@given(probs(), probs())
def test_bernoulli_kl_properties(a, b):
    kl = bernoulli_kl(a, b)
    assert np.all(np.isnan(kl) == False)  # noqa: E712
    assert np.all(kl >= -1e-12)
    np.testing.assert_allclose(bernoulli_kl(a, a), 0.0, atol=1e-12)
    assert np.all(np.isfinite(kl_bits(a, b)))
    np.testing.assert_allclose(
        kl_bits(a, np.clip(b, 1e-6, 1 - 1e-6)) * LN_2,
        bernoulli_kl(a, np.clip(b, 1e-6, 1 - 1e-6)),
        rtol=1e-12,
    )


LN_2 = np.log(2.0)


def test_bernoulli_kl_known_values():
    np.testing.assert_allclose(bernoulli_kl(0.5, 0.25), 0.5 * np.log(2) + 0.5 * np.log(2 / 3))
    assert bernoulli_kl(1.0, 0.0) == np.inf
    assert bernoulli_kl(0.0, 0.0) == 0.0


@settings(max_examples=300, deadline=None)
@given(bits(), probs())
def test_nll_and_focal(y0, q):
    nll = nll_bits(y0, q)
    assert np.all(np.isfinite(nll)) and np.all(nll >= 0)
    qc = np.clip(q, 1e-6, 1 - 1e-6)
    # log1p(-q) vs log(1 - q) differ by rounding of 1 - q near q = 0
    np.testing.assert_allclose(nll * LN_2, -np.log(np.where(y0 == 1, qc, 1 - qc)), rtol=1e-9)
    focal = focal_loss(q, y0)
    # gamma = 2 focal is the cross-entropy scaled by (1 - p_correct)^2 <= 1
    np.testing.assert_allclose(
        focal, nll * LN_2 * (1 - np.where(y0 == 1, qc, 1 - qc)) ** 2, rtol=1e-9, atol=1e-300
    )
    assert np.all(focal <= nll * LN_2 + 1e-15)


@settings(max_examples=200, deadline=None)
@given(schedule_and_t(), bits(), bits(), probs(), st.sampled_from(["eps", "y0"]))
def test_refiner_loss_terms_follow_section_6(sched_t, y0, y_t, p, param):
    s, t = sched_t
    perfect = np.abs(y_t - y0) if param == "eps" else y0
    kl, focal = refiner_loss_terms(y0, y_t, p, t, perfect, s, parameterization=param)
    if t == 1:
        np.testing.assert_allclose(kl, nll_bits(y0, y0))
    else:
        # a perfect prediction gives a KL of 0 up to the [PROB_EPS, 1 - PROB_EPS] clip
        assert np.all(kl < 1e-5)
    assert np.all(focal < 1e-5)
    wrong = 1.0 - perfect
    kl_w, _ = refiner_loss_terms(y0, y_t, p, t, wrong, s, parameterization=param)
    y0_hat = y0_from_eps(y_t, wrong) if param == "eps" else wrong
    if t > 1:
        want = kl_bits(q_posterior_mean(y_t, y0, p, t, s), q_posterior_mean(y_t, y0_hat, p, t, s))
        np.testing.assert_allclose(kl_w, want)
    total = refiner_loss(y0, y_t, p, t, wrong, s, parameterization=param, lambda_focal=0.5)
    _, focal_w = refiner_loss_terms(y0, y_t, p, t, wrong, s, parameterization=param)
    np.testing.assert_allclose(total, kl_w.mean() + 0.5 * focal_w.mean())


def test_prob_eps_is_exported():
    assert 0 < PROB_EPS < 1e-3
