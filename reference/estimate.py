"""The analytic estimate of y0 from y_t and the prior, and the ``bayes`` output offset.

Before looking at the image, the only facts about y0 are the prior p (y0 ~ B(p), the segmentor's
belief) and the noisy state y_t ~ B(abar_t y0 + (1 - abar_t) p) (method §3). Bayes' rule per
element, with m = abar_t y0 + (1 - abar_t) p:

    P(y0 = 1 | y_t = 1) = p (abar_t + (1 - abar_t) p) / P(y_t = 1)
    P(y_t = 1) = p (abar_t + (1 - abar_t) p) + (1 - p) (1 - abar_t) p = p
    =>  P(y0 = 1 | y_t = 1) = abar_t + (1 - abar_t) p

    P(y0 = 1 | y_t = 0) = p (1 - abar_t) (1 - p) / (1 - p) = (1 - abar_t) p

so the posterior mean is linear in y_t:

    E[y0 | y_t, p]  = abar_t * y_t + (1 - abar_t) * p                                   (y0 form)
    E[eps | y_t, p] = |y_t - E[y0 | y_t, p]| = (1 - abar_t) * |y_t - p|                 (eps form)

(the eps form uses y_t in {0, 1}: eps = y_t XOR y0). At t = T with abar_T ~ 0 the estimate is the
prior itself, so a refiner whose output is this estimate reproduces the segmentor at one step.

**Offset ``"bayes"``.** The refiner's logits are added to the logit of that estimate:

    output = sigmoid(logit(net) + logit(estimate)) = net * e / (net * e + (1 - net) * (1 - e))

with ``net`` the network's own sigmoid output and ``e`` the estimate, both clipped into
[PROB_EPS, 1 - PROB_EPS]. An untrained (zero) head gives net = 1/2 and output = e: the refiner
starts at the segmentor instead of at "every pixel 1/2". Offset ``"none"`` is the landed form
(output = net). The offset lives outside the network, so every exported graph and runtime runs the
same network and only this function differs.
"""

from __future__ import annotations

import numpy as np

from .schedule import Schedule

#: probabilities are clipped into [PROB_EPS, 1 - PROB_EPS] where a logarithm or a logit meets them
PROB_EPS = 1e-6
OFFSETS = ("none", "bayes")


def check_offset(offset: str) -> str:
    if offset not in OFFSETS:
        raise ValueError(f"unknown offset {offset!r}; allowed: {', '.join(OFFSETS)}")
    return offset


def bayes_estimate(
    y_t: np.ndarray, prior: np.ndarray, abar_t: float, parameterization: str
) -> np.ndarray:
    """E[target | y_t, p] for the target of ``parameterization`` ("eps" or "y0"), see above."""
    y_t = np.asarray(y_t, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    if parameterization == "eps":
        return (1.0 - abar_t) * np.abs(y_t - prior)
    if parameterization == "y0":
        return abar_t * y_t + (1.0 - abar_t) * prior
    raise ValueError(f"unknown parameterization {parameterization!r}; allowed: eps, y0")


def add_logits(net: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """sigmoid(logit(net) + logit(estimate)) in probability form, both clipped into
    [PROB_EPS, 1 - PROB_EPS] (so the result is in (0, 1) and never NaN)."""
    q = np.clip(np.asarray(net, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    e = np.clip(np.asarray(estimate, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    num = q * e
    return num / (num + (1.0 - q) * (1.0 - e))


def refiner_output(
    net: np.ndarray,
    y_t: np.ndarray,
    prior: np.ndarray,
    t: int,
    schedule: Schedule,
    *,
    parameterization: str = "eps",
    offset: str = "none",
) -> np.ndarray:
    """The refiner's output probability (eps_hat or y0_hat) from the network's own probability
    ``net`` at array index ``t`` of ``schedule``: ``net`` itself for offset "none", the
    ``bayes`` combination otherwise."""
    if check_offset(offset) == "none":
        return np.asarray(net, dtype=np.float64)
    abar_t = float(schedule.alphas_cumprod[t])
    return add_logits(net, bayes_estimate(y_t, prior, abar_t, parameterization))
