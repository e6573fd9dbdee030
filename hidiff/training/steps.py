"""One training iteration of alternate-collaborative training (method §6).

Refiner phase: the segmentor is frozen (``no_grad`` and eval mode, so batch-norm statistics are
not updated); its prior ``p = prior_from_logits(logits)`` and detached features are inputs. For
``t ~ U{1..T}`` and ``y_t = q_sample(y0, p, t, u)`` (``t`` and ``u`` from an explicit generator),
``L_diff = diffusion_loss(sigmoid(refiner(x, y_t, p, features, t)))`` with the network evaluated
once; the refiner's optimizer steps. The full-precision twin, when present, gets the same inputs
(same ``t``, ``y_t``) and its own optimizer.

Segmentor phase: the refiner is frozen (``requires_grad`` off, eval mode, no step); the segmentor
in train mode minimises ``L_seg + lambda_diff * L_diff`` where ``L_diff`` runs through the frozen
refiner with the prior and features *not* detached, so the diffusion loss reaches the segmentor
through them (``y_t`` is drawn from the detached prior: sampling has no gradient).

A pre-training step trains the segmentor on ``L_seg`` alone; a refine-only step is the refiner
phase alone (the last phase of a run with ``refine_after_steps`` / ``refine_after_minutes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hidiff.diffusion import BernoulliDiffusion, DiffusionLoss, diffusion_loss, nll_bits
from hidiff.seg_loss import segmentation_loss
from hidiff.segmentor import prior_from_logits
from hidiff.training.distributed import unwrap

__all__ = ["DiffusionDraws", "Networks", "Optimizers", "StepSettings", "frozen",
           "pretrain_step", "refiner_phase", "segmentor_phase", "train_step"]


@dataclass
class Networks:
    """The trained networks (each possibly wrapped in DistributedDataParallel)."""

    segmentor: nn.Module
    refiner: nn.Module
    refiner_fp: nn.Module | None = None


@dataclass
class Optimizers:
    segmentor: torch.optim.Optimizer
    refiner: torch.optim.Optimizer
    refiner_fp: torch.optim.Optimizer | None = None


@dataclass(frozen=True)
class StepSettings:
    lambda_diff: float = 1.0
    lambda_focal: float = 1.0
    parameterization: str = "eps"
    offset: str = "none"
    grad_clip: float | None = 1.0
    self_align: float = 0.0
    # 0 here (the library's and ablation's baseline); ``hidiff train`` passes its default 1
    lambda_y0: float = 0.0
    prior_noise: float = 0.0
    #: the y0 term also in the segmentor phase's L_diff (``False``: the refiner's loss only)
    y0_in_segmentor: bool = True
    #: probability that a diffusion sample's t (both phases) is set to T, the step every chain
    #: starts with and the only one one-step sampling evaluates; otherwise t ~ U{1..T} (so a
    #: share f + (1 - f) / T of the samples is at T)
    t_focus: float = 0.0

    def __post_init__(self) -> None:
        if not self.prior_noise >= 0:
            raise ValueError(f"prior_noise must be >= 0; got {self.prior_noise!r}")
        if isinstance(self.t_focus, bool) or not 0.0 <= self.t_focus <= 1.0:
            raise ValueError(f"t_focus must be in [0, 1]; got {self.t_focus!r}")


#: the perturbation field of ``prior_noise`` is drawn at 1 / PRIOR_NOISE_STRIDE of the image size
#: and upsampled: region-sized errors (a missed or extra blob), like a segmentor's on new images
PRIOR_NOISE_STRIDE = 8


class DiffusionDraws:
    """The diffusion randomness of training: ``t ~ U{1..T}`` and the uniforms ``u`` of
    ``q_sample``, from one explicit CPU generator (so draws do not depend on the device)."""

    def __init__(self, num_steps: int, seed: int) -> None:
        self.num_steps = int(num_steps)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self._field_generator: torch.Generator | None = None

    def draw(self, like: Tensor, *, t_focus: float = 0.0) -> tuple[Tensor, Tensor]:
        """``t`` (N,) int64 on CPU in 1..T and ``u`` shaped like ``like`` on its device.

        ``t_focus = f > 0``: each sample is then set to t = T with probability f (drawn after
        ``u``, from the same generator; with f = 0 nothing more is drawn)."""
        n = like.shape[0]
        t = torch.randint(1, self.num_steps + 1, (n,), generator=self.generator)
        u = torch.rand(tuple(like.shape), generator=self.generator, dtype=torch.float32)
        if t_focus > 0:
            at_last = torch.rand((n,), generator=self.generator) < t_focus
            t = torch.where(at_last, torch.full_like(t, self.num_steps), t)
        return t, u.to(device=like.device, dtype=like.dtype)

    def draw_align(self, like: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
        """Which samples are self-aligned (``(N,)`` bool, each with probability ``fraction``) and
        the uniforms of their chain start y_T ~ B(p), shaped like ``like``."""
        pick = torch.rand((like.shape[0],), generator=self.generator) < fraction
        u = torch.rand(tuple(like.shape), generator=self.generator, dtype=torch.float32)
        return pick, u.to(device=like.device, dtype=like.dtype)

    def draw_field(self, like: Tensor, stride: int) -> Tensor:
        """A smooth standard-normal field shaped like ``like`` (N, K, H, W): drawn at 1/stride
        of H and W, upsampled bilinearly, each sample scaled by its own U(0, 1). From a second
        generator (seeded from the same seed), so ``t`` and ``u`` are the same draws with or
        without it; not in :meth:`get_state` (``hidiff train`` does not use it)."""
        if self._field_generator is None:
            self._field_generator = torch.Generator(device="cpu")
            self._field_generator.manual_seed(self.seed + 0x5EED)
        gen = self._field_generator
        n, k, h, w = like.shape
        coarse = torch.randn((n, k, -(-h // stride), -(-w // stride)), generator=gen)
        scale = torch.rand((n, 1, 1, 1), generator=gen)
        field = torch.nn.functional.interpolate(coarse * scale, size=(h, w), mode="bilinear",
                                                align_corners=False)
        return field.to(device=like.device, dtype=like.dtype)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """The plain module in eval mode with ``requires_grad`` off; both restored on exit."""
    core = unwrap(module)
    was_training = core.training
    flags = [(p, p.requires_grad) for p in core.parameters()]
    core.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield core
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        core.train(was_training)


def _optimise(loss: Tensor, module: nn.Module, optimizer: torch.optim.Optimizer,
              grad_clip: float | None) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in module.parameters() if p.grad is not None]
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    optimizer.step()
    return float(norm)


def _refiner_loss(refiner: nn.Module, diffusion: BernoulliDiffusion, settings: StepSettings,
                  x: Tensor, y0: Tensor, y_t: Tensor, prior: Tensor,
                  features: tuple[Tensor, ...], t: Tensor):
    t_net = diffusion.original_steps(t).to(x.device)
    logits = refiner(x, y_t, prior, features, t_net)  # evaluated once
    output = diffusion.refiner_output(logits, y_t=y_t, prior=prior, t=t,
                                      parameterization=settings.parameterization,
                                      offset=settings.offset)
    loss = diffusion_loss(diffusion, output, y0=y0, y_t=y_t, prior=prior, t=t,
                          parameterization=settings.parameterization,
                          lambda_focal=settings.lambda_focal)
    if not settings.lambda_y0:
        return loss
    # cross-entropy of the y0 estimate at every t (what one-step sampling thresholds)
    y0_hat = diffusion.y0_from_output(y_t, output, settings.parameterization)
    extra = nll_bits(y0, y0_hat).mean()
    return DiffusionLoss(loss.total + settings.lambda_y0 * extra, loss.kl, loss.focal)


@torch.no_grad()
def self_aligned_sample(refiner: nn.Module, diffusion: BernoulliDiffusion, settings: StepSettings,
                        x: Tensor, y0: Tensor, prior: Tensor, features: tuple[Tensor, ...],
                        t: Tensor, u: Tensor, u_start: Tensor) -> Tensor:
    """y_t built from the refiner's own estimate, as sampling builds it (recycling).

    The chain starts at y_T ~ B(p) (``u_start < p``); the refiner, in eval mode and without
    gradient, estimates y0_hat from it; y_t ~ B(abar_t y0_hat + (1 - abar_t) p) (``u < mean``).
    Training on such y_t (target still the true y0) teaches the refiner to correct its own
    errors, which is what every step after the first sees at inference (exposure bias)."""
    core = unwrap(refiner)
    was_training = core.training
    core.eval()
    try:
        big_t = torch.full_like(t, diffusion.num_steps)
        y_big = (u_start < prior).to(prior.dtype)
        logits = core(x, y_big, prior, features, diffusion.original_steps(big_t).to(x.device))
        output = diffusion.refiner_output(logits, y_t=y_big, prior=prior, t=big_t,
                                          parameterization=settings.parameterization,
                                          offset=settings.offset)
        y0_hat = diffusion.y0_from_output(y_big, output, settings.parameterization)
    finally:
        core.train(was_training)
    return diffusion.q_sample(y0_hat, prior, t, u)


def perturbed_prior(prior: Tensor, field: Tensor, sigma: float) -> Tensor:
    """The prior moved by ``sigma * field`` in logit space (K = 1: ``sigmoid(logit(p) + n)``;
    K > 1: ``softmax(log p + n)``), probabilities clamped to [1e-4, 1 - 1e-4] first so that a
    saturated prior can move."""
    p = prior.clamp(1e-4, 1.0 - 1e-4)
    if prior.shape[1] == 1:
        return torch.sigmoid(torch.log(p) - torch.log1p(-p) + sigma * field)
    return torch.softmax(torch.log(p) + sigma * field, dim=1)


def refiner_phase(nets: Networks, opts: Optimizers, diffusion: BernoulliDiffusion,
                  draws: DiffusionDraws, x: Tensor, y0: Tensor,
                  settings: StepSettings) -> dict[str, float]:
    """Train the refiner (and its FP twin) on the frozen segmentor's outputs.

    With ``settings.self_align = r > 0`` a fraction r of the batch (drawn per sample) gets its
    y_t from :func:`self_aligned_sample` instead of q(y_t | y0, p). With
    ``settings.prior_noise = s > 0`` the refiner trains on :func:`perturbed_prior` (a smooth
    logit-space field of std up to s): priors as wrong as a segmentor's on images it never saw,
    where on its own training images it is nearly right."""
    with frozen(nets.segmentor) as seg, torch.no_grad():
        out = seg(x)
        prior = prior_from_logits(out.logits)
        features = tuple(f.detach() for f in out.features)
        if settings.prior_noise > 0:
            prior = perturbed_prior(prior, draws.draw_field(prior, PRIOR_NOISE_STRIDE),
                                    settings.prior_noise)
    t, u = draws.draw(y0, t_focus=settings.t_focus)
    y_t = diffusion.q_sample(y0, prior, t, u)
    if settings.self_align > 0:
        pick, u_start = draws.draw_align(y0, settings.self_align)
        if bool(pick.any()):  # only the picked rows run (eval mode: rows are independent)
            rows = pick.nonzero().squeeze(1).to(y_t.device)
            y_t = y_t.clone()
            y_t[rows] = self_aligned_sample(
                nets.refiner, diffusion, settings, x[rows], y0[rows], prior[rows],
                tuple(f[rows] for f in features), t[rows.cpu()], u[rows],
                u_start[rows]).to(y_t.dtype)  # 0/1 either way (autocast may give bf16)
    logs: dict[str, float] = {}
    pairs = [("refiner", nets.refiner, opts.refiner)]
    if nets.refiner_fp is not None and opts.refiner_fp is not None:
        pairs.append(("refiner_fp", nets.refiner_fp, opts.refiner_fp))
    for name, net, opt in pairs:
        net.train()
        loss = _refiner_loss(net, diffusion, settings, x, y0, y_t, prior, features, t)
        logs[f"grad_norm_{name}"] = _optimise(loss.total, net, opt, settings.grad_clip)
        logs[f"loss_{name}"] = float(loss.total.detach())
        if name == "refiner":
            logs["loss_refiner_kl"] = float(loss.kl.detach())
            logs["loss_refiner_focal"] = float(loss.focal.detach())
    return logs


def segmentor_losses(nets: Networks, diffusion: BernoulliDiffusion, draws: DiffusionDraws,
                     x: Tensor, y0: Tensor, settings: StepSettings
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, L_seg, L_diff)`` of the segmentor phase, graph attached (refiner frozen).

    Call inside ``frozen(nets.refiner)``; the segmentor runs in train mode.
    """
    nets.segmentor.train()
    out = nets.segmentor(x)
    prior = prior_from_logits(out.logits)
    l_seg = segmentation_loss(out.logits, y0)
    if not settings.y0_in_segmentor:
        settings = dataclasses.replace(settings, lambda_y0=0.0)
    t, u = draws.draw(y0, t_focus=settings.t_focus)
    y_t = diffusion.q_sample(y0, prior.detach(), t, u)
    refiner = unwrap(nets.refiner)
    if settings.lambda_diff == 0.0:  # no collaboration: L_diff only for the log
        with torch.no_grad():
            l_diff = _refiner_loss(refiner, diffusion, settings, x, y0, y_t, prior.detach(),
                                   tuple(f.detach() for f in out.features), t).total
        return l_seg, l_seg, l_diff
    l_diff = _refiner_loss(refiner, diffusion, settings, x, y0, y_t, prior, out.features,
                           t).total
    return l_seg + settings.lambda_diff * l_diff, l_seg, l_diff


def segmentor_phase(nets: Networks, opts: Optimizers, diffusion: BernoulliDiffusion,
                    draws: DiffusionDraws, x: Tensor, y0: Tensor,
                    settings: StepSettings) -> dict[str, float]:
    """Train the segmentor on L_seg + lambda_diff * L_diff through the frozen refiner."""
    with frozen(nets.refiner):
        total, l_seg, l_diff = segmentor_losses(nets, diffusion, draws, x, y0, settings)
        norm = _optimise(total, nets.segmentor, opts.segmentor, settings.grad_clip)
    return {"loss_segmentor": float(total.detach()), "loss_seg": float(l_seg.detach()),
            "loss_seg_diff": float(l_diff.detach()), "grad_norm_segmentor": norm}


def pretrain_step(nets: Networks, opts: Optimizers, x: Tensor, y0: Tensor,
                  settings: StepSettings) -> dict[str, float]:
    """Segmentor only, on L_seg."""
    nets.segmentor.train()
    l_seg = segmentation_loss(nets.segmentor(x).logits, y0)
    norm = _optimise(l_seg, nets.segmentor, opts.segmentor, settings.grad_clip)
    value = float(l_seg.detach())
    return {"loss_segmentor": value, "loss_seg": value, "grad_norm_segmentor": norm}


def train_step(nets: Networks, opts: Optimizers, diffusion: BernoulliDiffusion,
               draws: DiffusionDraws, x: Tensor, y0: Tensor, settings: StepSettings,
               *, pretrain: bool = False, refine_only: bool = False,
               refiner_batch: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """One iteration: a pre-training step, the refiner phase alone (``refine_only``: the
    segmentor stays frozen), or the refiner phase then the segmentor phase (alternating).

    ``refiner_batch``: ``(x, y0)`` of the refiner phase when it has its own cases (held out
    from the segmentor, so its priors are as wrong as on new images); default: ``x, y0``."""
    if pretrain and refine_only:
        raise ValueError("pretrain and refine_only exclude each other: one phase per iteration")
    if pretrain:
        return pretrain_step(nets, opts, x, y0, settings)
    xr, yr = (x, y0) if refiner_batch is None else refiner_batch
    logs = refiner_phase(nets, opts, diffusion, draws, xr, yr, settings)
    if not refine_only:
        logs.update(segmentor_phase(nets, opts, diffusion, draws, x, y0, settings))
    return logs
