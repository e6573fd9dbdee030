"""Posterior of the forward process, q(y_{t-1} | y_t, y0, p) (method §4).

With the Bernoulli likelihood L(y; m) = m^y (1 - m)^(1 - y) and v in {0, 1}:

    theta_v = [ alpha_t * 1(y_t = v) + (1 - alpha_t) * L(y_t; p) ]          # q(y_t | y_{t-1}=v, p)
            * [ abar_{t-1} * L(v; y0) + (1 - abar_{t-1}) * L(v; p) ]         # q(y_{t-1}=v | y0, p)

    q(y_{t-1} = 1 | y_t, y0, p) = theta_1 / (theta_0 + theta_1)

For y_t, y0 in [0, 1] the indicator and likelihoods are used in their multilinear form
(1(y_t = 1) = y_t, L(v; y0) = v*y0 + (1-v)*(1-y0)), so a continuous estimate y0_hat may stand in
for y0 (it equals marginalising y0 ~ B(y0_hat)).

Guard. theta_0 + theta_1 is the probability of the observed y_t; it is 0 only for configurations
that cannot occur (e.g. y_t = 1 with y0 = p = 0). Such elements return 0.5 (no information) rather
than NaN. Every other input, including saturated priors p in {0, 1}, is computed exactly.
"""

from __future__ import annotations

import numpy as np

from .forward import _check_t
from .schedule import Schedule

UNDEFINED_POSTERIOR = 0.5


def q_posterior_mean(
    y_t: np.ndarray, y0: np.ndarray, prior: np.ndarray, t: int, schedule: Schedule
) -> np.ndarray:
    """q(y_{t-1} = 1 | y_t, y0, p) for t >= 1 (float64, NaN-free for inputs in [0, 1])."""
    t = _check_t(t, schedule, low=1)
    y_t = np.asarray(y_t, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    p = np.asarray(prior, dtype=np.float64)
    alpha, abar_prev = schedule.alphas[t], schedule.alphas_cumprod[t - 1]

    lik_yt = y_t * p + (1.0 - y_t) * (1.0 - p)  # L(y_t; p)
    theta_1 = (alpha * y_t + (1.0 - alpha) * lik_yt) * (abar_prev * y0 + (1.0 - abar_prev) * p)
    theta_0 = (alpha * (1.0 - y_t) + (1.0 - alpha) * lik_yt) * (
        abar_prev * (1.0 - y0) + (1.0 - abar_prev) * (1.0 - p)
    )
    den = theta_0 + theta_1
    safe = den > 0.0
    return np.where(safe, theta_1 / np.where(safe, den, 1.0), UNDEFINED_POSTERIOR)
