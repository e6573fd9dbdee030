"""Per-element training loss terms of the refiner (method §6).

For a step t drawn uniformly and y_t ~ q(y_t | y0, p), with the network evaluated once:

    t > 1:  L_KL = KL( q(y_{t-1} | y_t, y0, p) || q(y_{t-1} | y_t, y0_hat, p) ) / ln 2   [bits]
    t = 1:  L_KL = -log B(y0; y0_hat) / ln 2                                          [bits]
    L_focal = focal(output, target), gamma = 2; target = |y_t - y0| (eps), y0 (y0 param.)
    L_diff  = mean(L_KL) + lambda_focal * mean(L_focal),  lambda_focal = 1

Bernoulli KL (nats), with 0 log 0 = 0:

    KL(a || b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))

Focal loss (nats), pred and target in [0, 1]:

    focal(pred, target) = -[ target (1 - pred)^gamma log(pred)
                             + (1 - target) pred^gamma log(1 - pred) ]

Model probabilities are clipped into [PROB_EPS, 1 - PROB_EPS] inside the log terms, so every loss is
finite; ``bernoulli_kl`` itself is exact (it may return inf).
"""

from __future__ import annotations

import math

import numpy as np

from .estimate import PROB_EPS
from .forward import _check_t
from .posterior import q_posterior_mean
from .sampling import PARAMETERIZATIONS, _check_choice, y0_from_output
from .schedule import Schedule

LN2 = math.log(2.0)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x * log(y) with 0 * log(anything) = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, y)))


def bernoulli_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(B(a) || B(b)) in nats, elementwise (exact; inf where a > 0 = b or a < 1 = b)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return _xlogy(a, a) - _xlogy(a, b) + _xlogy(1.0 - a, 1.0 - a) - _xlogy(1.0 - a, 1.0 - b)


def _clip_prob(p: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(p, np.float64), PROB_EPS, 1.0 - PROB_EPS)


def kl_bits(target_mean: np.ndarray, model_mean: np.ndarray) -> np.ndarray:
    """Bernoulli KL in bits with the model probability clipped into [PROB_EPS, 1 - PROB_EPS]."""
    return bernoulli_kl(target_mean, _clip_prob(model_mean)) / LN2


def nll_bits(y0: np.ndarray, y0_hat: np.ndarray) -> np.ndarray:
    """-log2 B(y0; y0_hat), with y0_hat clipped into [PROB_EPS, 1 - PROB_EPS]."""
    q = _clip_prob(y0_hat)
    y0 = np.asarray(y0, np.float64)
    return -(y0 * np.log(q) + (1.0 - y0) * np.log1p(-q)) / LN2


def focal_loss(pred: np.ndarray, target: np.ndarray, *, gamma: float = 2.0) -> np.ndarray:
    """Binary focal loss (nats), elementwise, pred clipped into [PROB_EPS, 1 - PROB_EPS]."""
    q = _clip_prob(pred)
    target = np.asarray(target, np.float64)
    return -(target * (1.0 - q) ** gamma * np.log(q) + (1.0 - target) * q**gamma * np.log1p(-q))


def refiner_loss_terms(
    y0: np.ndarray,
    y_t: np.ndarray,
    prior: np.ndarray,
    t: int,
    output: np.ndarray,
    schedule: Schedule,
    *,
    parameterization: str = "eps",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-element ``(L_KL in bits, L_focal)`` for one step t and the network's ``output``."""
    _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
    t = _check_t(t, schedule, low=1)
    y0 = np.asarray(y0, np.float64)
    y0_hat = y0_from_output(y_t, output, parameterization)
    if t == 1:
        kl = nll_bits(y0, y0_hat)
    else:
        kl = kl_bits(
            q_posterior_mean(y_t, y0, prior, t, schedule),
            q_posterior_mean(y_t, y0_hat, prior, t, schedule),
        )
    target = np.abs(np.asarray(y_t, np.float64) - y0) if parameterization == "eps" else y0
    return kl, focal_loss(output, target)


def refiner_loss(
    y0: np.ndarray,
    y_t: np.ndarray,
    prior: np.ndarray,
    t: int,
    output: np.ndarray,
    schedule: Schedule,
    *,
    parameterization: str = "eps",
    lambda_focal: float = 1.0,
) -> float:
    """L_diff = mean(L_KL) + lambda_focal * mean(L_focal) for one step (method §6)."""
    kl, focal = refiner_loss_terms(
        y0, y_t, prior, t, output, schedule, parameterization=parameterization
    )
    return float(kl.mean() + lambda_focal * focal.mean())
