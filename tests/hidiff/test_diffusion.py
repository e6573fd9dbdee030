"""Torch Bernoulli diffusion == the NumPy reference on identical inputs and uniforms.

Sampled bits are compared exactly. Probabilities are compared in float64 with rtol 1e-12 (same
formulas, only the association order of a few float64 operations may differ) and in float32 with
rtol 1e-5 / atol 1e-6 (float32 has ~7 significant digits and the schedule is cast to float32).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bits, probs, respaced_schedules, schedule_and_t

import reference
from hidiff.diffusion import BernoulliDiffusion, diffusion_loss
from hidiff.scheduler import BernoulliScheduler, BernoulliSchedulerConfig

F64 = {"rtol": 1e-12, "atol": 1e-15}


def tt(a, dtype=torch.float64):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def batch(*arrays):
    """Reference functions take one t; torch takes per-sample t: use a batch of one."""
    return [tt(a)[None] for a in arrays]


@settings(max_examples=200, deadline=None)
@given(schedule_and_t(low=0), bits(), probs(), st.integers(0, 2**31 - 1))
def test_forward_process_matches_reference(sched_t, y0, p, seed):
    s, t = sched_t
    d = BernoulliDiffusion(s)
    u = np.random.default_rng(seed).random(y0.shape)
    ty0, tp, tu = batch(y0, p, u)
    tidx = torch.tensor([t])
    np.testing.assert_allclose(
        d.q_mean(ty0, tp, tidx)[0].numpy(), reference.q_mean(y0, p, t, s), **F64
    )
    # the same uniforms give the same bits, exactly
    np.testing.assert_array_equal(
        d.q_sample(ty0, tp, tidx, tu)[0].numpy(), reference.q_sample(y0, p, t, s, u)
    )


@settings(max_examples=300, deadline=None)
@given(schedule_and_t(), bits(), probs(), probs())
def test_posterior_matches_reference_including_saturated_priors(sched_t, y_t, y0, p):
    s, t = sched_t
    d = BernoulliDiffusion(s)
    got = d.q_posterior_mean(*batch(y_t, y0, p), torch.tensor([t]))[0].numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference.q_posterior_mean(y_t, y0, p, t, s), **F64)


@settings(max_examples=200, deadline=None)
@given(respaced_schedules(), st.data(), bits(), probs())
def test_ddim_mean_matches_reference_on_respaced_chains(s, data, y_t, y0_hat):
    t = data.draw(st.integers(1, s.num_steps))
    t_prev = data.draw(st.integers(0, t - 1))
    d = BernoulliDiffusion(s)
    got = d.ddim_mean(*batch(y_t, y0_hat), torch.tensor([t]), torch.tensor([t_prev]))[0]
    np.testing.assert_allclose(got.numpy(), reference.ddim_mean(y_t, y0_hat, t, t_prev, s), **F64)


@settings(max_examples=200, deadline=None)
@given(schedule_and_t(), bits(), bits(), probs(), probs(), st.sampled_from(["eps", "y0"]))
def test_loss_terms_match_reference(sched_t, y0, y_t, p, out, param):
    s, t = sched_t
    d = BernoulliDiffusion(s)
    kl, focal = d.loss_terms(
        tt(out)[None],
        y0=tt(y0)[None],
        y_t=tt(y_t)[None],
        prior=tt(p)[None],
        t=torch.tensor([t]),
        parameterization=param,
    )
    want_kl, want_focal = reference.refiner_loss_terms(
        y0, y_t, p, t, out, s, parameterization=param
    )
    np.testing.assert_allclose(kl[0].numpy(), want_kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(focal[0].numpy(), want_focal, rtol=1e-10, atol=1e-12)


def test_per_sample_steps_in_one_batch_match_per_sample_reference():
    s = reference.make_schedule("cosine", 10)
    d = BernoulliDiffusion(s)
    rng = np.random.default_rng(0)
    y0 = (rng.random((4, 1, 5, 5)) < 0.5).astype(float)
    p, out = rng.random(y0.shape), rng.random(y0.shape)
    u = rng.random(y0.shape)
    t = np.array([1, 2, 7, 10])
    y_t = d.q_sample(tt(y0), tt(p), torch.tensor(t), tt(u)).numpy()
    loss = diffusion_loss(
        d, tt(out), y0=tt(y0), y_t=tt(y_t), prior=tt(p), t=torch.tensor(t), lambda_focal=0.7
    )
    kls, focals = [], []
    for i in range(4):
        np.testing.assert_array_equal(y_t[i], reference.q_sample(y0[i], p[i], t[i], s, u[i]))
        kl, focal = reference.refiner_loss_terms(y0[i], y_t[i], p[i], t[i], out[i], s)
        kls.append(kl)
        focals.append(focal)
    np.testing.assert_allclose(loss.kl.item(), np.mean(kls), rtol=1e-10)
    np.testing.assert_allclose(loss.total.item(), np.mean(kls) + 0.7 * np.mean(focals), rtol=1e-10)


def test_float32_matches_reference_within_named_tolerance():
    # float32: ~7 significant digits; the float64 schedule is cast to float32 once.
    s = reference.make_schedule("cosine", 10)
    d = BernoulliDiffusion(s)
    rng = np.random.default_rng(1)
    y_t = (rng.random((2, 1, 8, 8)) < 0.5).astype(np.float32)
    y0_hat, p = rng.random(y_t.shape).astype(np.float32), rng.random(y_t.shape).astype(np.float32)
    for t in range(1, 11):
        got = d.q_posterior_mean(
            torch.from_numpy(y_t),
            torch.from_numpy(y0_hat),
            torch.from_numpy(p),
            torch.tensor([t, t]),
        )
        want = reference.q_posterior_mean(y_t, y0_hat, p, t, s)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
@pytest.mark.parametrize("param", ["eps", "y0"])
@pytest.mark.parametrize("steps", [None, 3, [2, 5, 10]])
@pytest.mark.parametrize("offset", ["none", "bayes"])
def test_scheduler_loop_equals_reference_reverse_process(sampler, param, steps, offset):
    cfg = BernoulliSchedulerConfig(num_train_timesteps=10, parameterization=param, sampler=sampler,
                                   offset=offset)
    sch = BernoulliScheduler(cfg)
    sch.set_timesteps(steps)
    rng = np.random.default_rng(3)
    prior = rng.random((2, 1, 6, 6))
    w = rng.random(prior.shape)

    def net(y, step):  # any deterministic function of (y_t, step) stands in for the refiner
        return np.clip(0.5 * w + 0.3 * y * (step / 10.0), 0.0, 1.0)

    u = reference.draw_uniforms(11, prior.shape, sch.num_draws)
    want = reference.reverse_process(
        prior,
        net,
        schedule=sch.diffusion.schedule,
        uniforms=u,
        method=sampler,
        parameterization=param,
        offset=offset,
    )
    y = sch.initial_sample(tt(prior), tt(u[0]))
    seen = [y.numpy()]
    for k, step in enumerate(sch.timesteps.tolist()):
        out = tt(net(y.numpy(), step))
        res = sch.step(
            out, step, y, prior=tt(prior), u=tt(u[k + 1]) if k + 1 < sch.num_draws else None
        )
        y = res.prev_sample
        if res.prev_mean is not None:
            seen.append(y.numpy())
    np.testing.assert_array_equal(y.numpy(), want.y0_hat)
    for a, b in zip(seen, want.states, strict=True):
        np.testing.assert_array_equal(a, b[0])  # chain 0 of S = 1


def test_scheduler_rejects_bad_configs_and_steps():
    with pytest.raises(ValueError, match="allowed: eps, y0"):
        BernoulliSchedulerConfig(parameterization="x")
    with pytest.raises(ValueError, match="allowed: ddim, ancestral"):
        BernoulliSchedulerConfig(sampler="ddpm")
    sch = BernoulliScheduler(BernoulliSchedulerConfig())
    sch.set_timesteps(2)
    with pytest.raises(ValueError, match="not among the scheduled"):
        sch.step(
            torch.zeros(1, 1, 2, 2),
            3,
            torch.zeros(1, 1, 2, 2),
            prior=torch.zeros(1, 1, 2, 2),
            u=torch.zeros(1, 1, 2, 2),
        )
    with pytest.raises(ValueError):
        sch.set_timesteps([3, 5])  # must contain T


def test_gradients_flow_through_the_loss_to_the_output():
    d = BernoulliDiffusion.from_name("cosine", 10)
    out = torch.full((2, 1, 4, 4), 0.3, requires_grad=True)
    y0 = torch.zeros(2, 1, 4, 4)
    loss = diffusion_loss(
        d, out, y0=y0, y_t=y0, prior=torch.full_like(y0, 0.4), t=torch.tensor([1, 5])
    )
    loss.total.backward()
    assert out.grad is not None and torch.all(torch.isfinite(out.grad))
    assert out.grad.abs().sum() > 0


@pytest.mark.parametrize("param", ["eps", "y0"])
def test_saturated_priors_give_finite_gradients_to_the_segmentor(param):
    """A trained segmentor's float32 prior is often exactly 0 or 1; the KL target (the posterior,
    a function of the prior) is then exactly 0 or 1, where ``xlogy(a, a)`` has a 0 / 0 gradient.
    The loss's gradient reaching the prior (the segmentor's diffusion loss) must stay finite."""
    d = BernoulliDiffusion.from_name("cosine", 10)
    prior = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 1e-30, 1.0 - 2**-24, 0.3]).view(2, 1, 2, 2)
    prior.requires_grad_(True)
    y0 = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]).view(2, 1, 2, 2)
    y_t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]).view(2, 1, 2, 2)
    out = torch.full_like(y0, 0.3, requires_grad=True)
    loss = diffusion_loss(d, out, y0=y0, y_t=y_t, prior=prior, t=torch.tensor([3, 7]),
                          parameterization=param)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert torch.all(torch.isfinite(prior.grad)) and torch.all(torch.isfinite(out.grad))


@pytest.mark.parametrize("param", ["eps", "y0"])
def test_training_offset_in_logit_space_equals_the_oracle(param):
    """refiner_output (training, logits + logit(estimate)) == reference.refiner_output applied to
    sigmoid(logits), and an all-zero logit map gives the analytic estimate."""
    s = reference.make_schedule("cosine", 10)
    diff = BernoulliDiffusion(s)
    rng = np.random.default_rng(0)
    shape = (10, 1, 4, 4)
    logits = rng.normal(0, 3, shape)
    logits[0] = 0.0
    y_t = (rng.random(shape) < 0.5).astype(np.float64)
    prior = rng.random(shape)
    prior[1, 0, 0, :2] = [0.0, 1.0]
    t = np.arange(1, 11)
    got = diff.refiner_output(torch.from_numpy(logits), y_t=torch.from_numpy(y_t),
                              prior=torch.from_numpy(prior), t=torch.from_numpy(t),
                              parameterization=param, offset="bayes").numpy()
    net = 1 / (1 + np.exp(-logits))
    want = np.stack([reference.refiner_output(net[i], y_t[i], prior[i], int(t[i]), s,
                                              parameterization=param, offset="bayes")
                     for i in range(10)])
    # logit-space vs probability-space evaluation of the same float64 quantity
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    est = reference.bayes_estimate(y_t[0], prior[0], s.alphas_cumprod[1], param)
    np.testing.assert_allclose(got[0], np.clip(est, reference.PROB_EPS, 1 - reference.PROB_EPS),
                               rtol=1e-12)
    plain = diff.refiner_output(torch.from_numpy(logits), y_t=torch.from_numpy(y_t),
                                prior=torch.from_numpy(prior), t=torch.from_numpy(t),
                                parameterization=param, offset="none").numpy()
    np.testing.assert_array_equal(plain, torch.sigmoid(torch.from_numpy(logits)).numpy())
