"""One iteration of alternate training (method §6): frozen means frozen, and the diffusion loss
reaches the segmentor in its phase."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hidiff.training.distributed import DistContext
from hidiff.training.run_state import build_state
from hidiff.training.setup import TrainArgs, prepare_run
from hidiff.training.steps import (
    DiffusionDraws,
    StepSettings,
    frozen,
    pretrain_step,
    refiner_phase,
    segmentor_losses,
    segmentor_phase,
    self_aligned_sample,
    train_step,
)

pytestmark = pytest.mark.data


@pytest.fixture
def run(kvasir_root, tmp_path, one_thread):
    args = TrainArgs(dataset="kvasir-seg", data=str(kvasir_root), preset="tiny",
                     out=str(tmp_path / "unused"), max_steps=1, batch_size=4, limit_cases=4,
                     train_fp_twin=True)
    state = build_state(prepare_run(args), DistContext())
    _, batch = next(state.batches)
    return state, batch["image"], batch["mask"]


def _snapshot(module):
    """Parameters and buffers (batch-norm running statistics and counters)."""
    return copy.deepcopy(module.state_dict())


def _changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_refiner_phase_leaves_the_segmentor_untouched(run):
    state, x, y0 = run
    nets = state.nets
    seg_before, ref_before = _snapshot(nets.segmentor), _snapshot(nets.refiner)
    fp_before = _snapshot(nets.refiner_fp)
    nets.segmentor.train()  # the phase must switch it to eval itself
    logs = refiner_phase(nets, state.opts, state.diffusion, state.draws, x, y0, state.settings)
    assert _changed(seg_before, nets.segmentor) == set()  # weights AND running stats
    assert nets.segmentor.training  # mode restored
    assert all(p.grad is None for p in nets.segmentor.parameters())
    changed = _changed(ref_before, nets.refiner)
    assert any(k.endswith("weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # the refiner trains in train mode
    assert _changed(fp_before, nets.refiner_fp)
    assert logs["loss_refiner"] > 0 and logs["loss_refiner_fp"] > 0


def test_segmentor_phase_leaves_the_refiner_untouched(run):
    state, x, y0 = run
    nets = state.nets
    seg_before, ref_before = _snapshot(nets.segmentor), _snapshot(nets.refiner)
    nets.refiner.train()
    logs = segmentor_phase(nets, state.opts, state.diffusion, state.draws, x, y0, state.settings)
    assert _changed(ref_before, nets.refiner) == set()
    assert all(p.grad is None for p in nets.refiner.parameters())
    assert all(p.requires_grad for p in nets.refiner.parameters())  # restored after the phase
    assert nets.refiner.training
    changed = _changed(seg_before, nets.segmentor)
    assert any(k.endswith("running_var") for k in changed)  # segmentor in train mode
    assert any(k.endswith("weight") for k in changed)
    assert logs["loss_segmentor"] == pytest.approx(logs["loss_seg"] + logs["loss_seg_diff"],
                                                   rel=1e-6)


def test_refine_only_step_trains_the_refiner_alone(run):
    state, x, y0 = run
    nets = state.nets
    ref_before = _snapshot(nets.refiner)
    opt = state.opts.segmentor
    pretrain_step(nets, state.opts, x, y0, state.settings)  # an optimizer state to keep
    seg_before, opt_before = _snapshot(nets.segmentor), copy.deepcopy(opt.state_dict()["state"])
    logs = train_step(nets, state.opts, state.diffusion, state.draws, x, y0, state.settings,
                      refine_only=True)
    assert _changed(seg_before, nets.segmentor) == set()
    opt_after = opt.state_dict()["state"]  # no segmentor step at all: Adam moments unchanged
    assert opt_before and opt_after.keys() == opt_before.keys()
    for k, moments in opt_before.items():
        assert all(torch.equal(v, opt_after[k][name]) for name, v in moments.items()), k
    assert any(k.endswith("weight") for k in _changed(ref_before, nets.refiner))
    assert "loss_refiner" in logs and "loss_segmentor" not in logs
    with pytest.raises(ValueError, match="pretrain and refine_only exclude each other"):
        train_step(nets, state.opts, state.diffusion, state.draws, x, y0, state.settings,
                   pretrain=True, refine_only=True)


def _segmentor_grads(state, x, y0, lambda_diff, draw_state):
    nets = state.nets
    settings = state.settings.__class__(**{**state.settings.__dict__,
                                           "lambda_diff": lambda_diff})
    state.draws.set_state(draw_state)
    nets.segmentor.zero_grad(set_to_none=True)
    with frozen(nets.refiner):
        total, _, l_diff = segmentor_losses(nets, state.diffusion, state.draws, x, y0, settings)
        total.backward()
    grads = {n: p.grad.clone() for n, p in nets.segmentor.named_parameters()}
    return grads, float(l_diff.detach())


def test_diffusion_loss_reaches_the_segmentor(run):
    state, x, y0 = run
    # train the refiner a little so that it is not at its zero-initialised output
    for _ in range(2):
        refiner_phase(state.nets, state.opts, state.diffusion, state.draws, x, y0, state.settings)
    draw_state = state.draws.get_state()
    refiner_grads = [p.grad.clone() for p in state.nets.refiner.parameters()]
    buffers = _snapshot(state.nets.segmentor)
    with_diff, l_diff_1 = _segmentor_grads(state, x, y0, 1.0, draw_state)
    state.nets.segmentor.load_state_dict(buffers)  # same BN statistics for the second pass
    seg_only, l_diff_0 = _segmentor_grads(state, x, y0, 0.0, draw_state)
    assert l_diff_1 == l_diff_0 > 0  # same draws, same refiner
    diff = torch.cat([(with_diff[n] - seg_only[n]).flatten() for n in with_diff])
    assert diff.abs().max() > 1e-6  # L_diff contributes to the segmentor's gradient
    # it flows through the features too, not only the prior: an early encoder conv differs
    assert not torch.allclose(with_diff["encoder.0.0.weight"], seg_only["encoder.0.0.weight"])
    for before, p in zip(refiner_grads, state.nets.refiner.parameters(), strict=True):
        assert torch.equal(before, p.grad)  # the frozen refiner accumulated nothing


def test_diffusion_draws_are_explicit_and_reproducible():
    like = torch.zeros(3, 1, 4, 4)
    a, b = DiffusionDraws(10, seed=7), DiffusionDraws(10, seed=7)
    torch.manual_seed(0)
    ta, ua = a.draw(like)
    torch.manual_seed(1)  # the global generator plays no part
    tb, ub = b.draw(like)
    assert torch.equal(ta, tb) and torch.equal(ua, ub)
    assert ta.dtype == torch.int64 and int(ta.min()) >= 1 and int(ta.max()) <= 10
    many, _ = DiffusionDraws(10, seed=0).draw(torch.zeros(2000, 1, 1, 1))
    assert set(many.tolist()) == set(range(1, 11))


def test_t_focus_moves_that_fraction_of_t_to_T_and_leaves_the_rest_as_drawn():
    like = torch.zeros(4000, 1, 2, 2)
    plain_t, plain_u = DiffusionDraws(10, seed=3).draw(like)
    zero_t, zero_u = DiffusionDraws(10, seed=3).draw(like, t_focus=0.0)
    assert torch.equal(plain_t, zero_t) and torch.equal(plain_u, zero_u)  # f = 0: no extra draw
    half_t, half_u = DiffusionDraws(10, seed=3).draw(like, t_focus=0.5)
    assert torch.equal(half_u, plain_u)  # drawn after u: the same u
    moved = half_t != plain_t
    assert bool((half_t[moved] == 10).all())  # only ever moved to T
    kept = half_t == plain_t
    at_t = float((half_t == 10).float().mean())
    assert abs(at_t - (0.5 + 0.5 / 10)) < 0.03  # 0.55: half moved, a tenth of the rest drawn T
    assert bool(kept.any()) and set(half_t[kept].tolist()) == set(range(1, 11))
    all_t, _ = DiffusionDraws(10, seed=3).draw(like, t_focus=1.0)
    assert bool((all_t == 10).all())
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="t_focus must be in"):
            StepSettings(t_focus=bad)


def test_self_aligned_sample_is_built_from_the_refiners_own_estimate(run):
    """y_t = (u < abar_t y0_hat + (1 - abar_t) p) with y0_hat the refiner's eval-mode estimate
    from y_T = (u_start < p); the refiner's weights and running statistics stay as they were."""
    state, x, y0 = run
    nets, diff, settings = state.nets, state.diffusion, state.settings
    with torch.no_grad():
        out = nets.segmentor.eval()(x)
        prior = torch.sigmoid(out.logits)
    features = tuple(out.features)
    gen = torch.Generator().manual_seed(3)
    t = torch.tensor([1, 4, 7, 10])
    u, u_start = (torch.rand(y0.shape, generator=gen) for _ in range(2))
    ref = nets.refiner.train()
    before = _snapshot(ref)
    got = self_aligned_sample(ref, diff, settings, x, y0, prior, features, t, u, u_start)
    assert _changed(before, ref) == set() and ref.training
    ref.eval()
    with torch.no_grad():
        y_big = (u_start < prior).float()
        big = torch.full_like(t, diff.num_steps)
        logits = ref(x, y_big, prior, features, big)
        output = diff.refiner_output(logits, y_t=y_big, prior=prior, t=big,
                                     parameterization=settings.parameterization,
                                     offset=settings.offset)
        y0_hat = diff.y0_from_output(y_big, output, settings.parameterization)
    want = diff.q_sample(y0_hat, prior, t, u)
    assert torch.equal(got, want)
    assert not torch.equal(got, diff.q_sample(y0, prior, t, u))  # not the plain forward draw


def test_refiner_phase_with_full_self_alignment_trains_only_the_refiner(run):
    state, x, y0 = run
    nets = state.nets
    settings = dataclasses.replace(state.settings, self_align=1.0)
    seg_before, ref_before = _snapshot(nets.segmentor), _snapshot(nets.refiner)
    logs = refiner_phase(nets, state.opts, state.diffusion, state.draws, x, y0, settings)
    assert _changed(seg_before, nets.segmentor) == set()
    assert any(k.endswith("weight") for k in _changed(ref_before, nets.refiner))
    assert logs["loss_refiner"] > 0


def test_perturbed_prior_properties():
    """Logit-space perturbation: sigma 0 is the (clamped) prior, probabilities stay in (0, 1)
    (K = 1) or on the simplex (K > 1), a positive field raises p, exact 0 / 1 priors can move."""
    from hidiff.training.steps import perturbed_prior

    g = torch.Generator().manual_seed(0)
    prior = torch.rand((2, 1, 8, 8), generator=g)
    prior[0, 0, 0] = 0.0  # exact zeros and ones, as a trained float32 segmentor gives
    prior[0, 0, 1] = 1.0
    field = torch.randn((2, 1, 8, 8), generator=g)
    same = perturbed_prior(prior, field, 0.0)
    torch.testing.assert_close(same, prior.clamp(1e-4, 1 - 1e-4), rtol=0, atol=1e-6)
    moved = perturbed_prior(prior, field, 2.0)
    assert torch.all((moved > 0) & (moved < 1))
    up = field > 0
    assert torch.all(moved[up] > same[up]) and torch.all(moved[~up] <= same[~up])
    assert moved[0, 0, 0].max() > 1e-4 and moved[0, 0, 1].min() < 1 - 1e-4
    k3 = torch.softmax(torch.randn((2, 3, 8, 8), generator=g), 1)
    out = perturbed_prior(k3, torch.randn((2, 3, 8, 8), generator=g), 1.5)
    torch.testing.assert_close(out.sum(1), torch.ones((2, 8, 8)))


def test_prior_field_is_smooth_seeded_and_scaled_per_sample():
    like = torch.zeros((3, 1, 32, 40))
    a = DiffusionDraws(10, seed=5).draw_field(like, 8)
    b = DiffusionDraws(10, seed=5).draw_field(like, 8)
    assert a.shape == like.shape and torch.equal(a, b)
    # smooth: neighbouring pixels differ far less than the field's spread
    assert (a[..., 1:] - a[..., :-1]).abs().mean() < 0.2 * a.std()
    assert not torch.equal(a[0], a[1])
    # its own generator: t and u are the same draws with or without the field
    with_field = DiffusionDraws(10, seed=5)
    with_field.draw_field(like, 8)
    plain = DiffusionDraws(10, seed=5)
    for got, want in zip(with_field.draw(like), plain.draw(like), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="prior_noise must be >= 0; got -1"):
        StepSettings(prior_noise=-1)


def test_refiner_phase_with_prior_noise_is_deterministic_and_differs(run):
    state, x, y0 = run
    results = []
    for noise in (0.0, 2.0, 2.0):
        nets = copy.deepcopy(state.nets)
        opts = type(state.opts)(
            torch.optim.AdamW(nets.segmentor.parameters(), lr=0.0),
            torch.optim.AdamW(nets.refiner.parameters(), lr=1e-3))
        draws = DiffusionDraws(state.diffusion.num_steps, seed=3)
        settings = dataclasses.replace(state.settings, prior_noise=noise)
        nets.refiner_fp = None
        logs = refiner_phase(nets, opts, state.diffusion, draws, x, y0, settings)
        results.append(logs["loss_refiner"])
    assert results[1] == results[2]
    assert results[0] != results[1]


def test_lambda_y0_adds_the_y0_cross_entropy_to_the_refiner_phase_loss(run):
    """Same networks and draws at weights 0, 1, 2: the KL and focal terms do not move, and the
    total grows linearly by the (positive) cross-entropy of the y0 estimate."""
    state, x, y0 = run
    start = state.draws.get_state()
    logs = {}
    for weight in (0.0, 1.0, 2.0):
        nets, opts = copy.deepcopy((state.nets, state.opts))  # optimizers keep their networks
        state.draws.set_state(start)
        settings = dataclasses.replace(state.settings, lambda_y0=weight, self_align=0.0)
        logs[weight] = refiner_phase(nets, opts, state.diffusion, state.draws, x, y0, settings)
    for key in ("loss_refiner_kl", "loss_refiner_focal"):
        assert logs[0.0][key] == logs[1.0][key] == logs[2.0][key], key
    extra = logs[1.0]["loss_refiner"] - logs[0.0]["loss_refiner"]
    assert extra > 0
    # float32 sums of the same terms in a different order: relative 1e-5
    assert logs[2.0]["loss_refiner"] - logs[0.0]["loss_refiner"] == pytest.approx(2 * extra,
                                                                                  rel=1e-5)


def test_y0_term_refiner_only_leaves_it_out_of_the_segmentor_phase(run):
    """Same networks and draws: with ``y0_in_segmentor`` off the segmentor phase's L_diff is the
    one of weight 0, with it on it is larger by the (positive) y0 cross-entropy; the refiner
    phase keeps the term either way."""
    state, x, y0 = run
    start = state.draws.get_state()

    def l_diff(**changes):
        state.draws.set_state(start)
        settings = dataclasses.replace(state.settings, self_align=0.0, **changes)
        with frozen(state.nets.refiner), torch.no_grad():
            return float(segmentor_losses(state.nets, state.diffusion, state.draws, x, y0,
                                          settings)[2])

    plain = l_diff(lambda_y0=0.0)
    assert l_diff(lambda_y0=1.0, y0_in_segmentor=False) == plain
    assert l_diff(lambda_y0=1.0, y0_in_segmentor=True) > plain
    logs = {}
    for flag in (True, False):
        nets, opts = copy.deepcopy((state.nets, state.opts))
        state.draws.set_state(start)
        settings = dataclasses.replace(state.settings, lambda_y0=1.0, self_align=0.0,
                                       y0_in_segmentor=flag)
        logs[flag] = refiner_phase(nets, opts, state.diffusion, state.draws, x, y0, settings)
    assert logs[True]["loss_refiner"] == logs[False]["loss_refiner"]


@pytest.mark.parametrize(("y0_term", "in_segmentor"), [("both", True), ("refiner", False)])
def test_y0_term_reaches_the_step_settings(kvasir_root, tmp_path, one_thread, y0_term,
                                           in_segmentor):
    args = TrainArgs(dataset="kvasir-seg", data=str(kvasir_root), preset="tiny",
                     out=str(tmp_path / "unused"), max_steps=1, batch_size=4, limit_cases=4,
                     y0_term=y0_term)
    settings = build_state(prepare_run(args), DistContext()).settings
    assert settings.y0_in_segmentor is in_segmentor and settings.lambda_y0 == 1.0


def test_t_focus_reaches_the_draws_of_both_phases(run):
    """Each phase draws its t with the settings' ``t_focus``: after the phase the generator is
    where one ``draw(y0, t_focus=f)`` leaves it (f > 0 draws once more than f = 0)."""
    state, x, y0 = run
    start = state.draws.get_state()

    def state_after_one_draw(f):
        state.draws.set_state(start)
        state.draws.draw(y0, t_focus=f)
        return state.draws.get_state()

    assert not torch.equal(state_after_one_draw(0.0), state_after_one_draw(1.0))
    for f in (0.0, 1.0):
        settings = dataclasses.replace(state.settings, self_align=0.0, t_focus=f)
        state.draws.set_state(start)
        with frozen(state.nets.refiner), torch.no_grad():
            segmentor_losses(state.nets, state.diffusion, state.draws, x, y0, settings)
        assert torch.equal(state.draws.get_state(), state_after_one_draw(f)), f
        nets, opts = copy.deepcopy((state.nets, state.opts))
        state.draws.set_state(start)
        refiner_phase(nets, opts, state.diffusion, state.draws, x, y0, settings)
        assert torch.equal(state.draws.get_state(), state_after_one_draw(f)), f
