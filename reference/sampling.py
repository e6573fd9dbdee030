"""Reverse process: parameterisations, DDIM-style and ancestral steps, the sampling loop
(method §5).

Parameterisations of the refiner's output (a per-element probability):

    eps:  eps_hat is the probability that the element was flipped;  y0_hat = |y_t - eps_hat|
    y0:   the output is y0_hat directly

Steps, for array indices t > t_prev of the schedule in use (respaced or not):

    ancestral  mu = q(y_{t-1} = 1 | y_t, y0_hat, p)                     (t_prev = t - 1)
    DDIM-style sigma = (1 - abar_{t_prev}) / (1 - abar_t)
               mu    = sigma * y_t + (abar_{t_prev} - sigma * abar_t) * y0_hat
    then y_{t_prev} ~ B(mu), i.e. ``u < mu``.

The DDIM coefficients make the prior drop out of the step and preserve the marginal:
if y_t ~ B(abar_t y0 + (1 - abar_t) p) and y0_hat = y0 then y_{t_prev} ~ B(abar_{t_prev} y0 +
(1 - abar_{t_prev}) p).

Loop: y_n ~ B(p); for t = n..2: y0_hat = f(y_t, timesteps[t]); y_{t-1} ~ B(step mean);
at t = 1 return y0_hat (a probability map). Final mask: y0_hat > 0.5 when K = 1, argmax over the
channel axis when K > 1.

Uniforms: ``draw_uniforms(seed, shape, n)`` gives n arrays from numpy's PCG64: index 0 draws y_n,
index k >= 1 draws the sample of the k-th reverse step (t = n - k + 1 -> t - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .forward import _check_t, bernoulli_sample
from .posterior import q_posterior_mean
from .schedule import Schedule

PARAMETERIZATIONS = ("eps", "y0")
SAMPLERS = ("ddim", "ancestral")


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def y0_from_eps(y_t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """y0_hat = |y_t - eps_hat| (exact for binary eps, the flip-probability estimate otherwise)."""
    return np.abs(np.asarray(y_t, np.float64) - np.asarray(eps, np.float64))


def y0_from_output(y_t: np.ndarray, output: np.ndarray, parameterization: str) -> np.ndarray:
    """The y0 estimate implied by the refiner output under ``parameterization``."""
    _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
    if parameterization == "eps":
        return y0_from_eps(y_t, output)
    return np.asarray(output, dtype=np.float64)


def ddim_mean(
    y_t: np.ndarray, y0_hat: np.ndarray, t: int, t_prev: int, schedule: Schedule
) -> np.ndarray:
    """Mean of the DDIM-style Bernoulli step from index t to t_prev < t (clipped into [0, 1])."""
    t = _check_t(t, schedule, low=1)
    t_prev = _check_t(t_prev, schedule)
    if t_prev >= t:
        raise ValueError(f"t_prev must be smaller than t, got t={t}, t_prev={t_prev}")
    abar_t, abar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    sigma = (1.0 - abar_prev) / (1.0 - abar_t)  # abar_t < 1 for t >= 1 since every beta > 0
    mean = sigma * np.asarray(y_t, np.float64) + (abar_prev - sigma * abar_t) * np.asarray(
        y0_hat, np.float64
    )
    return np.clip(mean, 0.0, 1.0)


def step_mean(
    y_t: np.ndarray,
    y0_hat: np.ndarray,
    prior: np.ndarray,
    t: int,
    schedule: Schedule,
    *,
    method: str = "ddim",
) -> np.ndarray:
    """Mean of y_{t-1} given the y0 estimate, for ``method`` in ("ddim", "ancestral")."""
    _check_choice(method, SAMPLERS, "sampler")
    if method == "ddim":
        return ddim_mean(y_t, y0_hat, t, t - 1, schedule)
    return q_posterior_mean(y_t, y0_hat, prior, t, schedule)


def draw_uniforms(seed: int, shape: tuple[int, ...], count: int) -> np.ndarray:
    """``count`` arrays of uniforms in [0, 1) of ``shape`` from PCG64(seed), stacked (float64)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.random((count, *shape), dtype=np.float64)


def final_mask(y0_hat: np.ndarray, *, channel_axis: int = -3) -> np.ndarray:
    """Mask from the probability map: ``> 0.5`` for one channel, argmax over channels for K > 1.

    Returns uint8 with the channel axis kept for K = 1 (0/1) and removed for K > 1 (labels).
    """
    y0_hat = np.asarray(y0_hat)
    if y0_hat.shape[channel_axis] == 1:
        return (y0_hat > 0.5).astype(np.uint8)
    return np.argmax(y0_hat, axis=channel_axis).astype(np.uint8)


@dataclass(frozen=True)
class ReverseResult:
    """Output of :func:`reverse_process`: the final y0 estimate and every sampled state."""

    y0_hat: np.ndarray
    states: tuple[np.ndarray, ...]


def reverse_process(
    prior: np.ndarray,
    denoise_fn: Callable[[np.ndarray, int], np.ndarray],
    *,
    schedule: Schedule,
    uniforms: np.ndarray,
    method: str = "ddim",
    parameterization: str = "eps",
) -> ReverseResult:
    """Run the reverse chain from y_n ~ B(prior) to the final y0 estimate.

    ``denoise_fn(y_t, original_step)`` returns the refiner's output probabilities.
    ``uniforms`` has shape ``(n, *prior.shape)`` with n = ``schedule.num_steps``.
    """
    _check_choice(method, SAMPLERS, "sampler")
    _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
    prior = np.asarray(prior, dtype=np.float64)
    n = schedule.num_steps
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if uniforms.shape != (n, *prior.shape):
        raise ValueError(f"uniforms must have shape {(n, *prior.shape)}, got {uniforms.shape}")
    y = bernoulli_sample(prior, uniforms[0])
    states = [y]
    for k, t in enumerate(range(n, 0, -1)):
        out = np.asarray(denoise_fn(y, int(schedule.timesteps[t])), dtype=np.float64)
        y0_hat = y0_from_output(y, out, parameterization)
        if t == 1:
            return ReverseResult(y0_hat, tuple(states))
        y = bernoulli_sample(
            step_mean(y, y0_hat, prior, t, schedule, method=method), uniforms[k + 1]
        )
        states.append(y)
    raise AssertionError("unreachable: the loop returns at t = 1")
