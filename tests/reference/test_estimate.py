"""The analytic estimate E[y0 | y_t, p], the ``bayes`` offset and S-chain sampling (oracle)."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bits, probs, respaced_schedules, schedule_and_t

from reference import (
    PROB_EPS,
    Sampler,
    add_logits,
    bayes_estimate,
    chain_uniforms,
    check_estimate,
    draw_uniforms,
    final_mask,
    make_schedule,
    refiner_output,
    respace,
    reverse_process,
    y0_from_output,
)


def brute_force_estimate(y_t, p, abar, target):
    """E[target | y_t] with y0 ~ B(p), y_t ~ B(abar y0 + (1 - abar) p), by enumeration in exact
    rationals; target "y0" or "eps" (= y_t XOR y0). None where y_t has probability 0."""
    y_t, p, abar = int(y_t), Fraction(p), Fraction(abar)
    num = den = Fraction(0)
    for y0 in (0, 1):
        w = p if y0 else 1 - p
        m = abar * y0 + (1 - abar) * p
        joint = w * (m if y_t else 1 - m)
        den += joint
        num += joint * (y0 if target == "y0" else int(y0 != y_t))
    return None if den == 0 else num / den


@settings(max_examples=400, deadline=None)
@given(schedule_and_t(low=0), bits(), probs(), st.sampled_from(["y0", "eps"]))
def test_bayes_estimate_equals_brute_force_bayes(sched_t, y_t, p, target):
    s, t = sched_t
    abar = s.alphas_cumprod[t]
    got = bayes_estimate(y_t, p, abar, target)
    for i in range(y_t.size):
        want = brute_force_estimate(y_t[i], p[i], abar, target)
        if want is not None:  # impossible y_t (probability 0): any value is a valid estimate
            # float64 evaluation of a two-term linear formula: a few ulps
            assert got[i] == pytest.approx(float(want), rel=1e-12, abs=1e-15)
    assert np.all((got >= 0) & (got <= 1))


@settings(max_examples=300, deadline=None)
@given(probs(), probs())
def test_add_logits_is_the_sigmoid_of_summed_logits_and_nan_free(net, est):
    got = add_logits(net, est)
    assert np.all(np.isfinite(got)) and np.all((got > 0) & (got < 1))
    q = np.clip(net, PROB_EPS, 1 - PROB_EPS)
    e = np.clip(est, PROB_EPS, 1 - PROB_EPS)
    z = np.log(q) - np.log1p(-q) + np.log(e) - np.log1p(-e)
    # two routes through logs and exps of float64: relative 1e-9
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-z)), rtol=1e-9, atol=1e-15)
    # a network output of exactly 1/2 (zero logits) adds nothing
    np.testing.assert_allclose(add_logits(np.full_like(est, 0.5), est), e, rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(schedule_and_t(), bits(), probs(), st.sampled_from(["y0", "eps"]))
def test_refiner_output_offsets(sched_t, y_t, p, param):
    s, t = sched_t
    net = np.linspace(0.0, 1.0, y_t.size)
    np.testing.assert_array_equal(
        refiner_output(net, y_t, p, t, s, parameterization=param, offset="none"), net)
    want = add_logits(net, bayes_estimate(y_t, p, s.alphas_cumprod[t], param))
    np.testing.assert_array_equal(
        refiner_output(net, y_t, p, t, s, parameterization=param, offset="bayes"), want)
    with pytest.raises(ValueError, match="allowed: none, bayes"):
        refiner_output(net, y_t, p, t, s, offset="prior")


@pytest.mark.parametrize("param", ["eps", "y0"])
@pytest.mark.parametrize("name", ["cosine", "linear_abar"])
def test_an_untrained_refiner_with_the_bayes_offset_gives_the_segmentor_mask(param, name):
    """Zero head (output 1/2) at one sampling step: y0_hat = abar_T y_T + (1 - abar_T) p, i.e. the
    prior up to abar_T (exactly 0 for linear_abar, 2.4e-5 for cosine at T = 10)."""
    s = respace(make_schedule(name, 10), [10])
    rng = np.random.default_rng(3)
    prior = rng.random((2, 1, 16, 16))
    prior[0, 0, 0, :4] = [0.0, 1.0, 0.5, 0.5 + 1e-3]
    abar = s.alphas_cumprod[1]
    for seed in range(3):
        out = reverse_process(prior, lambda y, step: np.full(y.shape, 0.5), schedule=s,
                              uniforms=draw_uniforms(seed, prior.shape, 1),
                              parameterization=param, offset="bayes")
        # clipping into [PROB_EPS, 1 - PROB_EPS] moves exact 0/1 by PROB_EPS
        np.testing.assert_allclose(out.y0_hat, prior, atol=abar + 2 * PROB_EPS)
        clear = np.abs(prior - 0.5) > abar + 2 * PROB_EPS
        np.testing.assert_array_equal(final_mask(out.y0_hat)[clear], final_mask(prior)[clear])


@settings(max_examples=40, deadline=None)
@given(respaced_schedules(max_steps=12), st.sampled_from(["ddim", "ancestral"]),
       st.sampled_from(["eps", "y0"]), st.sampled_from(["none", "bayes"]),
       st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_s_chains_are_s_independent_runs_averaged(s, method, param, offset, samples, seed):
    rng = np.random.default_rng(seed)
    prior = rng.random((2, 1, 5, 5))
    prior[0, 0, 0, :3] = [0.0, 1.0, 0.5]
    w = rng.random(prior.shape[1:])

    def net(y, step):  # a deterministic "network" of y and the step
        return np.clip(0.3 * y + 0.4 * w[None] * (step / s.timesteps[-1]), 0, 1)

    kw = dict(schedule=s, method=method, parameterization=param, offset=offset)
    u = chain_uniforms(seed, prior.shape, s.num_steps, samples)
    got = reverse_process(prior, net, uniforms=u, samples=samples, **kw)
    singles = [reverse_process(prior, net, uniforms=u[:, c], **kw) for c in range(samples)]
    chains = np.stack([r.y0_hat for r in singles])
    np.testing.assert_array_equal(got.chains, chains)  # each chain exactly a single run
    np.testing.assert_allclose(got.y0_hat, chains.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.spread, chains.std(axis=0), rtol=0, atol=1e-15)
    assert got.states[0].shape == (samples, *prior.shape)
    if samples == 1:  # one chain: the estimate is that chain, and no spread
        np.testing.assert_array_equal(got.y0_hat, singles[0].y0_hat)
        assert not got.spread.any()


def test_one_chain_draws_what_the_single_chain_loop_draws():
    """S = 1 accepts (n, *shape) uniforms and gives the same numbers as chain_uniforms(..., 1)."""
    shape, n = (1, 1, 4, 4), 3
    np.testing.assert_array_equal(chain_uniforms(5, shape, n, 1)[:, 0], draw_uniforms(5, shape, n))
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        chain_uniforms(5, shape, n, 0)
    s = respace(make_schedule("cosine", 10), [5, 10])
    with pytest.raises(ValueError, match="uniforms must have shape"):
        reverse_process(np.full(shape, 0.5), lambda y, t: y, schedule=s,
                        uniforms=draw_uniforms(5, shape, 2), samples=2)


@settings(max_examples=40, deadline=None)
@given(respaced_schedules(max_steps=12), st.sampled_from(["ddim", "ancestral"]),
       st.sampled_from(["eps", "y0"]), st.sampled_from(["none", "bayes"]),
       st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_trajectory_estimate_is_the_mean_of_every_steps_y0_estimate(s, method, param, offset,
                                                                     samples, seed):
    rng = np.random.default_rng(seed)
    prior = rng.random((2, 1, 5, 5))
    prior[0, 0, 0, :3] = [0.0, 1.0, 0.5]  # exact zeros, ones and a tie
    w = rng.random(prior.shape[1:])

    def net(y, step):
        return np.clip(0.3 * y + 0.4 * w[None] * (step / s.timesteps[-1]), 0, 1)

    kw = dict(schedule=s, method=method, parameterization=param, offset=offset, samples=samples)
    u = chain_uniforms(seed, prior.shape, s.num_steps, samples)
    trace: list = []
    last = reverse_process(prior, net, uniforms=u, trace=trace, **kw)
    traj = reverse_process(prior, net, uniforms=u, estimate="trajectory", **kw)
    # the chains themselves do not depend on how their estimate is formed
    for a, b in zip(last.states, traj.states, strict=True):
        np.testing.assert_array_equal(a, b)
    # brute force: every step's y0_hat from the traced states and network outputs, then averaged
    priors = np.broadcast_to(prior, (samples, *prior.shape))
    per_step = [y0_from_output(y, refiner_output(out, y, priors, t, s, parameterization=param,
                                                 offset=offset), param)
                for t, y, out, _ in trace]
    assert len(per_step) == s.num_steps
    np.testing.assert_array_equal(per_step[-1], last.chains)
    # summed in step order then divided: the loop's own order, so equal to the last bit
    np.testing.assert_array_equal(traj.chains, np.sum(per_step, axis=0) / s.num_steps)
    np.testing.assert_allclose(traj.y0_hat, traj.chains.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(traj.spread, traj.chains.std(axis=0), rtol=0, atol=1e-15)
    assert ((traj.y0_hat >= 0) & (traj.y0_hat <= 1)).all()
    if s.num_steps == 1:  # one step: both estimates are that step's
        np.testing.assert_array_equal(traj.y0_hat, last.y0_hat)


def test_unknown_estimate_is_refused_with_the_allowed_values():
    s = respace(make_schedule("cosine", 10), [5, 10])
    shape = (1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown estimate 'mean'; allowed: last, trajectory"):
        reverse_process(np.full(shape, 0.5), lambda y, t: y, schedule=s,
                        uniforms=draw_uniforms(5, shape, 2), estimate="mean")
    with pytest.raises(ValueError, match="allowed: last, trajectory"):
        Sampler(s, estimate="final")
    assert check_estimate("trajectory") == "trajectory"
