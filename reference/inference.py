"""The whole-batch predict loop every runtime shares: segmentor once, then S reverse chains.

    result = predict_batch(x, segment=seg_fn, denoise=den_fn, sampler=Sampler(...), seed=0)
    result.prob, result.spread, result.prior          # (N, K, H, W) each
    labels = final_mask(result.prob)[:, 0]            # K = 1

The runtimes (torch ``hidiff.pipeline``, ``edge_runtime.session``) differ only in how they run
the networks, which they pass in as two callables:

- ``segment(x_chunk) -> (prior, context)``: the segmentor on normalised images ``(n, C, H, W)``;
  ``prior`` ``(n, K, H, W)`` probabilities, ``context`` whatever the runtime keeps per image batch
  (features, the refiner's time-independent part);
- ``denoise(context, y, step) -> probabilities``: one refiner step on the chain states ``y``
  ``(S * n, K, H, W)`` (chain-major: the ``context`` of image i serves rows ``i, n + i, ...``) at
  original step ``step``; the network's own sigmoid output.

Randomness: ``chain_uniforms(seed, (N, K, H, W), steps, S)`` for the whole batch, in the order of
:func:`reference.reverse_process`; the networks may run ``batch_size`` images at a time (the
uniforms of image i do not depend on it; float32 kernels may round differently per batch size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .estimate import check_offset
from .sampling import (
    PARAMETERIZATIONS,
    SAMPLERS,
    _check_choice,
    chain_uniforms,
    check_estimate,
    reverse_process,
)
from .schedule import Schedule

__all__ = ["DEFAULT_TILE_BATCH", "BatchPrediction", "Sampler", "predict_batch",
           "uncertainty_pixels"]

#: tiles per network run for tile-policy models, in every runtime (the batch size changes float32
#: rounding, so the runtimes must agree on it; small, since S chains multiply it)
DEFAULT_TILE_BATCH = 4


@dataclass(frozen=True)
class Sampler:
    """How to sample: the (respaced) schedule, the step method, the refiner's output form, the
    number of chains averaged per image and how a chain's estimate is formed from its steps
    (``estimate``, :func:`reference.reverse_process`)."""

    schedule: Schedule
    method: str = "ddim"
    parameterization: str = "eps"
    offset: str = "none"
    samples: int = 1
    estimate: str = "last"

    def __post_init__(self) -> None:
        _check_choice(self.method, SAMPLERS, "sampler")
        check_estimate(self.estimate)
        _check_choice(self.parameterization, PARAMETERIZATIONS, "parameterization")
        check_offset(self.offset)
        s = self.samples
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1:
            raise ValueError(f"samples must be an int >= 1; got {s!r}")


@dataclass(frozen=True)
class BatchPrediction:
    """``prob``: (N, K, H, W) float64 mean y0 estimate (the prior for the segmentor alone);
    ``spread``: (N, K, H, W) float64 standard deviation across chains; ``prior``: the
    segmentor's (N, K, H, W) probabilities as it returned them."""

    prob: np.ndarray
    spread: np.ndarray
    prior: np.ndarray


def predict_batch(
    x: np.ndarray,
    *,
    segment: Callable[[np.ndarray], tuple[np.ndarray, Any]],
    denoise: Callable[[Any, np.ndarray, int], np.ndarray] | None,
    sampler: Sampler | None,
    seed: int = 0,
    batch_size: int | None = None,
    trace: list | None = None,
) -> BatchPrediction:
    """Segment ``x`` (N, C, H, W) and refine with ``sampler`` (None or ``denoise`` None: the
    segmentor alone), ``batch_size`` images per network run (module docstring). ``trace``: see
    :func:`reference.reverse_process` (one entry per step and image chunk)."""
    n_img = int(x.shape[0])
    chunk = n_img if batch_size is None else max(1, int(batch_size))
    refine = sampler is not None and denoise is not None
    uniforms = None
    probs, spreads, priors = [], [], []
    for start in range(0, n_img, chunk):
        prior, context = segment(x[start:start + chunk])
        prior = np.asarray(prior)
        priors.append(prior)
        if not refine:
            probs.append(prior.astype(np.float64))
            spreads.append(np.zeros(prior.shape))
            continue
        if uniforms is None:
            uniforms = chain_uniforms(int(seed), (n_img, *prior.shape[1:]),
                                      sampler.schedule.num_steps, sampler.samples)
        result = reverse_process(
            prior,
            lambda y, step, context=context: denoise(context, y, step),
            schedule=sampler.schedule,
            uniforms=uniforms[:, :, start:start + prior.shape[0]],
            method=sampler.method,
            parameterization=sampler.parameterization,
            offset=sampler.offset,
            samples=sampler.samples,
            estimate=sampler.estimate,
            trace=trace,
        )
        probs.append(result.y0_hat)
        spreads.append(result.spread)
    return BatchPrediction(np.concatenate(probs), np.concatenate(spreads), np.concatenate(priors))


def uncertainty_pixels(spread: np.ndarray) -> np.ndarray:
    """(K, H, W) spread across chains -> (H, W) uint8 grey image of the uncertainty map.

    A per-pixel standard deviation of values in [0, 1] is at most 1/2 (chains split evenly
    between 0 and 1), so ``255 * min(2 * max_k spread_k, 1)``, rounded: 0 where every chain
    agrees, 255 where they split evenly."""
    spread = np.asarray(spread, dtype=np.float64)
    if spread.ndim != 3:
        raise ValueError(f"spread must be (K, H, W); got shape {spread.shape}")
    return np.rint(255.0 * np.clip(2.0 * spread.max(axis=0), 0.0, 1.0)).astype(np.uint8)
