"""One iteration of alternate training (method §6): frozen means frozen, and the diffusion loss
reaches the segmentor in its phase."""

from __future__ import annotations

import copy

import pytest
import torch

from hidiff.training.distributed import DistContext
from hidiff.training.run_state import build_state
from hidiff.training.setup import TrainArgs, prepare_run
from hidiff.training.steps import (
    DiffusionDraws,
    frozen,
    refiner_phase,
    segmentor_losses,
    segmentor_phase,
)

pytestmark = pytest.mark.data


@pytest.fixture
def run(kvasir_root, tmp_path, one_thread):
    args = TrainArgs(dataset="kvasir-seg", data=str(kvasir_root), preset="tiny",
                     out=str(tmp_path / "unused"), max_steps=1, batch_size=4, limit_cases=4)
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
