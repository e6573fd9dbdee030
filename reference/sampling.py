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

Loop: y_n ~ B(p); for t = n..2: y0_hat_t = f(y_t, timesteps[t]); y_{t-1} ~ B(step mean);
at t = 1 the chain's estimate is, by ``estimate``:

    last        y0_hat_1                                (the final step's y0 estimate)
    trajectory  (1 / n) * sum_{t=1..n} y0_hat_t         (every step's y0 estimate, averaged)

Each y0_hat_t estimates the same y0; averaging them costs no network evaluation and lowers the
variance of one chain's estimate (why that matters: docs/architecture.md, "Inference"); for n = 1
both are y0_hat_1.

S chains run side by side (one batch) and their estimates are averaged: the estimate is the mean,
the uncertainty map the spread across chains. Final mask: mean > 0.5 when K = 1, argmax over the
channel axis when K > 1.

Uniforms: ``draw_uniforms(seed, shape, n)`` gives n arrays from numpy's PCG64: index 0 draws y_n,
index k >= 1 draws the sample of the k-th reverse step (t = n - k + 1 -> t - 1). S chains draw
``chain_uniforms(seed, shape, n, S)`` = ``draw_uniforms(seed, (S, *shape), n)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .estimate import check_offset, refiner_output
from .forward import _check_t, bernoulli_sample
from .posterior import q_posterior_mean
from .schedule import Schedule

PARAMETERIZATIONS = ("eps", "y0")
SAMPLERS = ("ddim", "ancestral")
#: how a chain's estimate is formed from its steps' y0 estimates (module docstring)
ESTIMATES = ("last", "trajectory")


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_estimate(estimate: str) -> str:
    """``estimate`` if it is one of :data:`ESTIMATES`, else a ``ValueError`` listing them."""
    return _check_choice(estimate, ESTIMATES, "estimate")


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


def final_labels(prob: np.ndarray) -> np.ndarray:
    """(N, K, H, W) probabilities -> (N, H, W) uint8 label map (:func:`final_mask` per image:
    0/1 for K = 1, the class index for K > 1)."""
    prob = np.asarray(prob)
    if prob.ndim != 4:
        raise ValueError(f"prob must be (N, K, H, W); got shape {prob.shape}")
    mask = final_mask(prob, channel_axis=1)
    return mask[:, 0] if prob.shape[1] == 1 else mask


@dataclass(frozen=True)
class ReverseResult:
    """Output of :func:`reverse_process`.

    ``y0_hat``: the estimate, the mean of the chains' estimates (shape of the prior);
    ``spread``: their per-element standard deviation across chains (0 for one chain), the
    uncertainty map; ``chains``: every chain's estimate ``(S, *prior.shape)`` (its last y0
    estimate, or the mean of all its steps' for ``estimate="trajectory"``);
    ``states``: the sampled states ``(S, *prior.shape)`` from y_n down to y_1.
    """

    y0_hat: np.ndarray
    spread: np.ndarray
    chains: np.ndarray
    states: tuple[np.ndarray, ...]


def chain_uniforms(seed: int, shape: tuple[int, ...], count: int, samples: int = 1) -> np.ndarray:
    """The uniforms of ``samples`` chains: ``draw_uniforms(seed, (samples, *shape), count)``.

    PCG64 fills arrays in C order, so chain 0 of ``samples`` chains draws exactly what a single
    chain draws only when ``samples == 1``; the layout is ``(count, samples, *shape)``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 1:
        raise ValueError(f"samples must be an int >= 1; got {samples!r}")
    return draw_uniforms(seed, (int(samples), *shape), count)


def reverse_process(
    prior: np.ndarray,
    denoise_fn: Callable[[np.ndarray, int], np.ndarray],
    *,
    schedule: Schedule,
    uniforms: np.ndarray,
    method: str = "ddim",
    parameterization: str = "eps",
    offset: str = "none",
    samples: int = 1,
    estimate: str = "last",
    trace: list | None = None,
) -> ReverseResult:
    """Run ``samples`` (S) reverse chains from y_n ~ B(prior) and average their y0 estimates.

    ``prior``: (N, ...) float probabilities. ``denoise_fn(y, original_step)`` gets the states of
    all chains stacked chain-major along the first axis, ``(S * N, ...)`` (rows ``s * N`` to
    ``(s + 1) * N - 1`` are chain s), and returns the network's probabilities of that shape.
    ``offset`` turns them into the refiner's output (:func:`reference.estimate.refiner_output`).
    ``uniforms``: ``(n, S, *prior.shape)`` with n = ``schedule.num_steps`` (see
    :func:`chain_uniforms`); for S = 1 also ``(n, *prior.shape)``.

    ``estimate``: ``"last"`` (each chain's final y0_hat) or ``"trajectory"`` (the mean of its
    y0_hat over all n steps, summed in step order then divided by n; module docstring).
    The mask is taken from the mean estimate (:func:`final_mask`), never from one draw.
    ``trace`` (a list, optional) receives ``(t, y_t, net, mean or None)`` per step, arrays of
    shape ``(S, *prior.shape)`` (for checks and diagnosis).
    """
    _check_choice(method, SAMPLERS, "sampler")
    _check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
    check_offset(offset)
    check_estimate(estimate)
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 1:
        raise ValueError(f"samples must be an int >= 1; got {samples!r}")
    prior = np.asarray(prior, dtype=np.float64)
    n, s = schedule.num_steps, int(samples)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if s == 1 and uniforms.shape == (n, *prior.shape):
        uniforms = uniforms[:, None]
    if uniforms.shape != (n, s, *prior.shape):
        raise ValueError(f"uniforms must have shape {(n, s, *prior.shape)}, got {uniforms.shape}")
    priors = np.broadcast_to(prior, (s, *prior.shape))
    flat = (s * prior.shape[0], *prior.shape[1:])
    y = bernoulli_sample(priors, uniforms[0])
    states = [y]
    trajectory = estimate == "trajectory"
    total = np.zeros(y.shape) if trajectory else None
    for k, t in enumerate(range(n, 0, -1)):
        net = np.asarray(denoise_fn(y.reshape(flat), int(schedule.timesteps[t])), np.float64)
        if net.shape != flat:
            raise ValueError(f"denoise_fn returned shape {net.shape}, expected {flat}")
        out = refiner_output(net.reshape(y.shape), y, priors, t, schedule,
                             parameterization=parameterization, offset=offset)
        y0_hat = y0_from_output(y, out, parameterization)
        if trajectory:
            total += y0_hat
        if t == 1:
            if trace is not None:
                trace.append((t, y, net.reshape(y.shape), None))
            chains = total / n if trajectory else y0_hat
            return ReverseResult(chains.mean(axis=0), chains.std(axis=0), chains, tuple(states))
        mean = step_mean(y, y0_hat, priors, t, schedule, method=method)
        if trace is not None:
            trace.append((t, y, net.reshape(y.shape), mean))
        y = bernoulli_sample(mean, uniforms[k + 1])
        states.append(y)
    raise AssertionError("unreachable: the loop returns at t = 1")
