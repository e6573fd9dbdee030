"""Forward (noising) process: prior-guided Bernoulli noise (method §3).

With y0 the clean mask, p the segmentor's prior and B(m) an independent Bernoulli per element:

    one step     q(y_t | y_{t-1}, p) = B( alpha_t * y_{t-1} + (1 - alpha_t) * p )
    closed form  q(y_t | y0, p)      = B( abar_t * y0 + (1 - abar_t) * p )

The mean moves from the ground truth (t = 0) to the prior (t = T).

Flip-map reparameterisation (for binary y0):

    y_t = y0 XOR eps,   eps ~ B( (1 - abar_t) * |p - y0| )

Randomness is explicit: a Bernoulli sample is ``u < mean`` with ``u`` uniform in [0, 1) supplied by
the caller, so the same ``u`` gives bit-identical samples in every implementation.
"""

from __future__ import annotations

import numpy as np

from .schedule import Schedule


def _check_t(t: int, schedule: Schedule, *, low: int = 0) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise ValueError(f"t must be an integer index into the schedule, got {t!r}")
    t = int(t)
    if not low <= t <= schedule.num_steps:
        raise ValueError(f"t must be in {low}..{schedule.num_steps}, got {t}")
    return t


def bernoulli_sample(mean: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Sample B(mean) from uniforms: ``u < mean`` as float64 0/1 (shapes must match)."""
    mean = np.asarray(mean, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    if u.shape != mean.shape:
        raise ValueError(f"uniforms have shape {u.shape}, expected {mean.shape}")
    return (u < mean).astype(np.float64)


def q_mean(y0: np.ndarray, prior: np.ndarray, t: int, schedule: Schedule) -> np.ndarray:
    """Mean of q(y_t | y0, p): ``abar_t * y0 + (1 - abar_t) * p`` (float64)."""
    t = _check_t(t, schedule)
    abar = schedule.alphas_cumprod[t]
    return abar * np.asarray(y0, dtype=np.float64) + (1.0 - abar) * np.asarray(prior, np.float64)


def q_step_mean(y_prev: np.ndarray, prior: np.ndarray, t: int, schedule: Schedule) -> np.ndarray:
    """Mean of the one-step kernel q(y_t | y_{t-1}, p): ``alpha_t * y_{t-1} + (1-alpha_t) * p``."""
    t = _check_t(t, schedule, low=1)
    alpha = schedule.alphas[t]
    return alpha * np.asarray(y_prev, np.float64) + (1.0 - alpha) * np.asarray(prior, np.float64)


def q_sample(
    y0: np.ndarray, prior: np.ndarray, t: int, schedule: Schedule, u: np.ndarray
) -> np.ndarray:
    """Sample y_t ~ q(y_t | y0, p) as ``u < q_mean(y0, prior, t)`` (float64 0/1)."""
    return bernoulli_sample(q_mean(y0, prior, t, schedule), u)


def flip_probability(y0: np.ndarray, prior: np.ndarray, t: int, schedule: Schedule) -> np.ndarray:
    """Flip-map mean ``(1 - abar_t) * |p - y0|`` (the eps target's distribution, method §3)."""
    t = _check_t(t, schedule)
    diff = np.abs(np.asarray(prior, np.float64) - np.asarray(y0, np.float64))
    return (1.0 - schedule.alphas_cumprod[t]) * diff


def q_sample_flip(
    y0: np.ndarray, prior: np.ndarray, t: int, schedule: Schedule, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sample through the flip map: returns ``(y_t, eps)`` with ``y_t = y0 XOR eps``.

    ``y0`` must be binary. ``eps = u < flip_probability`` is the true flip map, the training
    target of the eps parameterisation.
    """
    y0 = np.asarray(y0, dtype=np.float64)
    if not np.all((y0 == 0) | (y0 == 1)):
        raise ValueError("q_sample_flip needs a binary y0 (values 0 or 1)")
    eps = bernoulli_sample(flip_probability(y0, prior, t, schedule), u)
    return np.abs(y0 - eps), eps
