"""Noise schedules of the Bernoulli diffusion (method §1-2).

Notation. Steps t = 1..T. beta_t is the noise of step t, alpha_t = 1 - beta_t and
abar_t = prod_{s <= t} alpha_s. By definition abar_0 = 1 (index 0 never wraps around to T).

Arrays are stored with length T + 1 so that index t *is* step t:

    betas[0] = 0, alphas[0] = 1, alphas_cumprod[0] = 1.

Named schedules (frozen once published):

``cosine`` (default, s = 0.008)
    abar(tau) = g(tau) / g(0),  g(tau) = cos^2( (tau + s) / (1 + s) * pi / 2 ),  tau = t / T
    beta_t = min(1 - abar_t / abar_{t-1}, 0.999), and abar is recomputed from the clipped betas
    so that every array is consistent (abar_t = prod alpha_s holds exactly).

``linear_abar``
    abar_t = 1 - t / T (so abar_T = 0 exactly and beta_T = 1).

Both give 0 < beta_t <= 1 for every T >= 1.

Respacing (fewer sampling steps). Given an increasing subset S = (s_1 < ... < s_n = T) of 1..T,
the respaced chain keeps abar at the kept steps, abar'_j = abar_{s_j}, and
beta'_j = 1 - abar_{s_j} / abar_{s_{j-1}} with s_0 = 0. The network is always told the *original*
step index, stored in ``Schedule.timesteps[j] = s_j``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SCHEDULE_NAMES = ("cosine", "linear_abar")
COSINE_S = 0.008
MAX_BETA = 0.999


@dataclass(frozen=True)
class Schedule:
    """A Bernoulli diffusion schedule; every array has length ``num_steps + 1``.

    ``timesteps[j]`` is the original step index of array index ``j`` (``timesteps[0] == 0``); for a
    schedule made by :func:`make_schedule` it is ``0..T``, for a respaced one the kept steps.
    """

    name: str
    num_steps: int
    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    timesteps: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.num_steps
        if self.timesteps is None:
            object.__setattr__(self, "timesteps", np.arange(n + 1, dtype=np.int64))
        for key in ("betas", "alphas", "alphas_cumprod", "timesteps"):
            arr = np.array(getattr(self, key), copy=True)
            if arr.shape != (n + 1,):
                raise ValueError(f"Schedule.{key} must have shape ({n + 1},), got {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, key, arr)

    @property
    def original_num_steps(self) -> int:
        """T of the schedule this one was respaced from (its own T when not respaced)."""
        return int(self.timesteps[-1])


def _cosine_abar(num_steps: int) -> np.ndarray:
    tau = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    g = np.cos((tau + COSINE_S) / (1.0 + COSINE_S) * math.pi / 2.0) ** 2
    return g / g[0]


def _from_alphas_cumprod(name: str, abar: np.ndarray, clip: float | None) -> Schedule:
    num_steps = abar.shape[0] - 1
    betas = np.zeros(num_steps + 1, dtype=np.float64)
    prev, cur = abar[:-1], abar[1:]
    # beta_t = 1 - abar_t / abar_{t-1}; abar_{t-1} > 0 for t <= T because abar_T is the only
    # value allowed to reach 0.
    betas[1:] = 1.0 - cur / prev
    if clip is not None:
        betas[1:] = np.minimum(betas[1:], clip)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    return Schedule(name, num_steps, betas, alphas, alphas_cumprod)


def make_schedule(name: str, num_steps: int) -> Schedule:
    """Build the named schedule with ``num_steps`` = T >= 1 steps (see the module docstring)."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    if name == "cosine":
        return _from_alphas_cumprod(name, _cosine_abar(num_steps), MAX_BETA)
    abar = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
    sched = _from_alphas_cumprod(name, abar, None)
    # Keep abar_T exactly 0 (cumprod of alphas already gives 0 since beta_T == 1).
    return sched


def respace(schedule: Schedule, steps: Sequence[int]) -> Schedule:
    """Restrict ``schedule`` to the kept original steps ``steps`` (method §2).

    ``steps`` must be strictly increasing, within 1..T of ``schedule`` and contain T. Index ``j``
    of the result is the ``j``-th kept step; ``result.timesteps[j]`` is its original index.
    ``schedule`` itself must not be respaced already.
    """
    if not np.array_equal(schedule.timesteps, np.arange(schedule.num_steps + 1)):
        raise ValueError("respace() takes an un-respaced schedule (made by make_schedule)")
    kept = [int(s) for s in steps]
    t_max = schedule.num_steps
    if not kept or kept[-1] != t_max:
        raise ValueError(f"respaced steps must end with T = {t_max}, got {kept}")
    if kept[0] < 1 or any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
        raise ValueError(f"respaced steps must be strictly increasing within 1..{t_max}: {kept}")
    idx = np.array([0, *kept], dtype=np.int64)
    abar = schedule.alphas_cumprod[idx]
    betas = np.zeros(len(idx), dtype=np.float64)
    betas[1:] = 1.0 - abar[1:] / abar[:-1]
    return Schedule(schedule.name, len(kept), betas, 1.0 - betas, abar.copy(), idx)


def spaced_steps(num_steps: int, count: int) -> list[int]:
    """``count`` evenly spread original steps in 1..T that always include T (for ``respace``)."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"count must be in 1..{num_steps}, got {count}")
    raw = np.linspace(num_steps, 0, count, endpoint=False)[::-1]
    steps = sorted({int(round(v)) for v in raw} | {num_steps})
    steps = [s for s in steps if s >= 1]
    while len(steps) < count:  # rounding collisions: fill with the largest unused steps
        missing = max(set(range(1, num_steps + 1)) - set(steps))
        steps = sorted([*steps, missing])
    return steps
