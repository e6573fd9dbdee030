"""The segmentor's learning-rate schedule over the part of a run in which it trains.

``constant`` (the historical default): AdamW at ``lr`` throughout. ``cosine``: the segmentor's
learning rate follows

    lr(f) = lr * (1 + cos(pi * f)) / 2,        f = clip(progress, 0, 1),

where ``progress`` is how far the run is towards the end of the segmentor's training: the
larger of ``step / end_steps`` and ``elapsed / end_seconds`` over the ends that are given. The
segmentor trains until the refiner-alone phase begins (``refine_after_steps`` /
``refine_after_minutes``) or the run stops (``max_steps`` / ``max_minutes``), whichever comes
first, so its learning rate reaches 0 there. A constant learning rate leaves the segmentor
wherever its last noisy step put it; annealing makes where a wall-clock budget happens to stop
matter less. The refiners keep the constant ``lr``.

A time budget makes the schedule depend on the machine's speed, as the phase switches of such a
run already do; a resumed run given a later end stretches the rest of the schedule to it.
"""

from __future__ import annotations

import math

__all__ = ["SEGMENTOR_SCHEDULES", "lr_factor", "segmentor_ends"]

#: the allowed values of ``segmentor_schedule``
SEGMENTOR_SCHEDULES = ("constant", "cosine")


def segmentor_ends(*, max_steps: int | None, max_minutes: float | None,
                   refine_after_steps: int | None,
                   refine_after_minutes: float | None) -> tuple[int | None, float | None]:
    """The iteration and the training second (resumed time included) at which the segmentor's
    training ends, each None when nothing bounds it in that unit. All four count the whole run
    from its start, across resumes.

    >>> segmentor_ends(max_steps=None, max_minutes=20.0, refine_after_steps=None,
    ...                refine_after_minutes=16.0)
    (None, 960.0)
    """
    steps = [s for s in (max_steps, refine_after_steps) if s is not None]
    seconds = [60.0 * m for m in (max_minutes, refine_after_minutes) if m is not None]
    return (min(steps) if steps else None), (min(seconds) if seconds else None)


def lr_factor(schedule: str, *, step: int, elapsed_s: float, end_steps: int | None,
              end_s: float | None) -> float:
    """The multiplier of the segmentor's learning rate for the iteration after ``step``
    completed ones, ``elapsed_s`` training seconds into the run (module docstring).

    >>> lr_factor("cosine", step=50, elapsed_s=0.0, end_steps=100, end_s=None)
    0.5
    >>> lr_factor("constant", step=99, elapsed_s=0.0, end_steps=100, end_s=None)
    1.0
    """
    if schedule not in SEGMENTOR_SCHEDULES:
        raise ValueError(f"segmentor_schedule must be one of {', '.join(SEGMENTOR_SCHEDULES)}; "
                         f"got {schedule!r}")
    if schedule == "constant":
        return 1.0
    progress = 0.0
    if end_steps is not None and end_steps > 0:
        progress = max(progress, step / end_steps)
    if end_s is not None and end_s > 0:
        progress = max(progress, elapsed_s / end_s)
    f = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * f))
