"""Bernoulli diffusion in PyTorch, mirroring :mod:`reference` (method §2-6).

The schedule arrays come from :func:`reference.make_schedule` (float64, index t = step t,
``alphas_cumprod[0] == 1``) and are cast to the dtype of the tensors they meet, so float64 inputs
reproduce the oracle to rounding and float32 inputs are what training uses.

``t`` is a LongTensor of per-sample *array indices* into the schedule in use (shape ``(N,)``);
``schedule.timesteps[t]`` is the original step index the network is told. All formulas are those
of the reference modules:

    q_mean            abar_t y0 + (1 - abar_t) p
    q_posterior_mean  theta_1 / (theta_0 + theta_1)                              (method §4)
    ddim_mean         sigma y_t + (abar_prev - sigma abar_t) y0_hat,
                      sigma = (1 - abar_prev) / (1 - abar_t)
    losses            KL / NLL in bits + lambda_focal * focal(gamma=2)          (method §6)

Randomness is explicit: Bernoulli draws are ``u < mean`` with ``u`` given by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import reference
from reference.estimate import PROB_EPS, check_offset
from reference.posterior import UNDEFINED_POSTERIOR
from reference.sampling import PARAMETERIZATIONS

LN2 = math.log(2.0)


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


class BernoulliDiffusion:
    """The forward process, posterior and steps of one (possibly respaced) schedule."""

    def __init__(self, schedule: reference.Schedule) -> None:
        self.schedule = schedule
        self._betas = torch.from_numpy(schedule.betas.copy())
        self._alphas = torch.from_numpy(schedule.alphas.copy())
        self._abar = torch.from_numpy(schedule.alphas_cumprod.copy())
        self.timesteps = torch.from_numpy(schedule.timesteps.copy())

    @classmethod
    def from_name(cls, name: str, num_steps: int) -> BernoulliDiffusion:
        return cls(reference.make_schedule(name, num_steps))

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def respaced(self, steps) -> BernoulliDiffusion:
        """The same diffusion restricted to the kept original ``steps`` (method §2)."""
        return BernoulliDiffusion(reference.respace(self.schedule, steps))

    # -- helpers -----------------------------------------------------------------------------
    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long, device="cpu")
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if t.shape != (like.shape[0],):
            raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
        if int(t.min()) < 0 or int(t.max()) > self.num_steps:
            raise ValueError(f"t must be in 0..{self.num_steps}, got {t.tolist()}")
        values = table[t].to(dtype=like.dtype, device=like.device)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def original_steps(self, t: torch.Tensor) -> torch.Tensor:
        """Original step indices told to the network for array indices ``t``."""
        return self.timesteps[torch.as_tensor(t, dtype=torch.long, device="cpu")]

    # -- forward process (method §3) -----------------------------------------------------------
    def q_mean(self, y0: torch.Tensor, prior: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self._gather(self._abar, t, y0)
        return abar * y0 + (1.0 - abar) * prior

    def q_sample(
        self, y0: torch.Tensor, prior: torch.Tensor, t: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """y_t ~ q(y_t | y0, p) as ``(u < mean)`` in the dtype of ``y0``."""
        mean = self.q_mean(y0, prior, t)
        return (u.to(mean.dtype) < mean).to(mean.dtype)

    # -- posterior (method §4) ----------------------------------------------------------------
    def q_posterior_mean(
        self, y_t: torch.Tensor, y0: torch.Tensor, prior: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        if int(t.min()) < 1:
            raise ValueError("q_posterior_mean needs t >= 1")
        alpha = self._gather(self._alphas, t, y_t)
        abar_prev = self._gather(self._abar, t - 1, y_t)
        lik_yt = y_t * prior + (1.0 - y_t) * (1.0 - prior)
        theta_1 = (alpha * y_t + (1.0 - alpha) * lik_yt) * (
            abar_prev * y0 + (1.0 - abar_prev) * prior
        )
        theta_0 = (alpha * (1.0 - y_t) + (1.0 - alpha) * lik_yt) * (
            abar_prev * (1.0 - y0) + (1.0 - abar_prev) * (1.0 - prior)
        )
        den = theta_0 + theta_1
        safe = den > 0
        # impossible configurations (probability 0) give 0.5, as in the reference
        return torch.where(
            safe, theta_1 / torch.where(safe, den, torch.ones_like(den)), UNDEFINED_POSTERIOR
        )

    # -- reverse steps (method §5) ------------------------------------------------------------
    def ddim_mean(
        self, y_t: torch.Tensor, y0_hat: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor
    ) -> torch.Tensor:
        abar_t = self._gather(self._abar, t, y_t)
        abar_prev = self._gather(self._abar, t_prev, y_t)
        sigma = (1.0 - abar_prev) / (1.0 - abar_t)
        return (sigma * y_t + (abar_prev - sigma * abar_t) * y0_hat).clamp(0.0, 1.0)

    def refiner_output(
        self,
        logits: torch.Tensor,
        *,
        y_t: torch.Tensor,
        prior: torch.Tensor,
        t: torch.Tensor,
        parameterization: str = "eps",
        offset: str = "none",
    ) -> torch.Tensor:
        """The refiner's output probability from the network's ``logits`` at array indices ``t``:
        ``sigmoid(logits)`` for offset "none", ``sigmoid(logits + logit(estimate))`` for "bayes"
        with the analytic estimate of :mod:`reference.estimate` clipped into
        [PROB_EPS, 1 - PROB_EPS] (training computes it in logit space; inference combines the
        network's probability with the estimate through :func:`reference.refiner_output`, the
        same function to rounding)."""
        _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
        if check_offset(offset) == "none":
            return torch.sigmoid(logits)
        abar = self._gather(self._abar, t, y_t)
        if parameterization == "eps":
            est = (1.0 - abar) * (y_t - prior).abs()
        else:
            est = abar * y_t + (1.0 - abar) * prior
        est = _clip_prob(est.to(logits.dtype))
        return torch.sigmoid(logits + torch.log(est) - torch.log1p(-est))

    def offset_output(
        self,
        net: torch.Tensor,
        *,
        y_t: torch.Tensor,
        prior: torch.Tensor,
        t: torch.Tensor,
        parameterization: str = "eps",
        offset: str = "none",
    ) -> torch.Tensor:
        """The refiner's output from the network's *probability* ``net`` (inference form of
        :meth:`refiner_output`; the formula of :func:`reference.refiner_output`)."""
        _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
        if check_offset(offset) == "none":
            return net
        abar = self._gather(self._abar, t, y_t)
        if parameterization == "eps":
            est = (1.0 - abar) * (y_t - prior).abs()
        else:
            est = abar * y_t + (1.0 - abar) * prior
        q, e = _clip_prob(net), _clip_prob(est)
        num = q * e
        return num / (num + (1.0 - q) * (1.0 - e))

    @staticmethod
    def y0_from_output(
        y_t: torch.Tensor, output: torch.Tensor, parameterization: str
    ) -> torch.Tensor:
        """``|y_t - eps_hat|`` for "eps", the output itself for "y0"."""
        _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
        return (y_t - output).abs() if parameterization == "eps" else output

    # -- training objective (method §6) -------------------------------------------------------
    def loss_terms(
        self,
        output: torch.Tensor,
        *,
        y0: torch.Tensor,
        y_t: torch.Tensor,
        prior: torch.Tensor,
        t: torch.Tensor,
        parameterization: str = "eps",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element ``(L_KL in bits, L_focal)``; ``output`` is the network's probability map.

        The network is evaluated once by the caller and ``output`` feeds both terms.
        """
        y0_hat = self.y0_from_output(y_t, output, parameterization)
        t = torch.as_tensor(t, dtype=torch.long)
        nll = nll_bits(y0, y0_hat)
        t_kl = t.clamp(min=2)  # t = 1 rows use the NLL; clamp keeps the gather in range
        if self.num_steps >= 2:
            kl = kl_bits(
                self.q_posterior_mean(y_t, y0, prior, t_kl),
                self.q_posterior_mean(y_t, y0_hat, prior, t_kl),
            )
            first = (t == 1).view(-1, *([1] * (output.ndim - 1))).to(output.device)
            diff_term = torch.where(first, nll, kl)
        else:
            diff_term = nll
        target = (y_t - y0).abs() if parameterization == "eps" else y0
        return diff_term, focal_loss(output, target)


@dataclass(frozen=True)
class DiffusionLoss:
    """The refiner objective of one batch: ``total = kl + lambda_focal * focal`` (means)."""

    total: torch.Tensor
    kl: torch.Tensor
    focal: torch.Tensor


def diffusion_loss(
    diffusion: BernoulliDiffusion,
    output: torch.Tensor,
    *,
    y0: torch.Tensor,
    y_t: torch.Tensor,
    prior: torch.Tensor,
    t: torch.Tensor,
    parameterization: str = "eps",
    lambda_focal: float = 1.0,
) -> DiffusionLoss:
    """L_diff = mean(L_KL) + lambda_focal * mean(L_focal) (method §6)."""
    kl, focal = diffusion.loss_terms(
        output, y0=y0, y_t=y_t, prior=prior, t=t, parameterization=parameterization
    )
    kl_mean, focal_mean = kl.mean(), focal.mean()
    return DiffusionLoss(kl_mean + lambda_focal * focal_mean, kl_mean, focal_mean)


def _clip_prob(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(PROB_EPS, 1.0 - PROB_EPS)


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, y)


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    """x log x with 0 log 0 = 0 and a finite gradient at x = 0 (``xlogy(x, x)`` has 0 / 0 there:
    the KL target is the posterior of a saturated prior, exactly 0 or 1 in float32, and its
    gradient reaches the segmentor)."""
    return torch.special.xlogy(x, x.clamp_min(torch.finfo(x.dtype).tiny))


def bernoulli_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(B(a) || B(b)) in nats, elementwise, 0 log 0 = 0 (exact; may be inf)."""
    return _xlogx(a) - _xlogy(a, b) + _xlogx(1.0 - a) - _xlogy(1.0 - a, 1.0 - b)


def kl_bits(target_mean: torch.Tensor, model_mean: torch.Tensor) -> torch.Tensor:
    """Bernoulli KL in bits with the model probability clipped into [PROB_EPS, 1 - PROB_EPS]."""
    return bernoulli_kl(target_mean, _clip_prob(model_mean)) / LN2


def nll_bits(y0: torch.Tensor, y0_hat: torch.Tensor) -> torch.Tensor:
    """-log2 B(y0; y0_hat) with y0_hat clipped into [PROB_EPS, 1 - PROB_EPS]."""
    q = _clip_prob(y0_hat)
    return -(y0 * torch.log(q) + (1.0 - y0) * torch.log1p(-q)) / LN2


def focal_loss(pred: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (nats), elementwise, pred clipped into [PROB_EPS, 1 - PROB_EPS]."""
    q = _clip_prob(pred)
    return -(
        target * (1.0 - q) ** gamma * torch.log(q) + (1.0 - target) * q**gamma * torch.log1p(-q)
    )
