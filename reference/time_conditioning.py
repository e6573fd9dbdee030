"""Time-dependent binarization (TB) and time-dependent activation (TA) (method §7).

Both are per-channel operations on an (N, C, *spatial) activation ``u`` (NCHW in the networks)
whose per-channel parameters come from the diffusion step: in the networks a small linear layer
maps the step embedding to them, and since t takes only T values they form a T x C table at
inference. Here they are given directly, as shape (C,) (shared by the batch) or (N, C) (one row
per sample, i.e. per sample's step t), and broadcast over the spatial axes.

TB (binarization with a learned, step-dependent threshold a(t))::

    TB(u)[n, c, ...] = sign(u[n, c, ...] - a[n, c])       sign(0) = +1, so u == a gives +1

TA (ReActNet's RPReLU, with its shifts conditioned on t)::

    TA(u)[n, c, ...] = prelu(u[n, c, ...] + zeta[n, c]; beta[c]) + gamma[n, c]
    prelu(v; b) = v      if v >= 0
                  b * v  if v <  0                         (slope only on the negative side)

``zeta`` and ``gamma`` are step-dependent shifts; ``beta`` (``slope``) is a learned per-channel
slope, normally (C,) (an (N, C) slope is accepted too). Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .quantize import sign

__all__ = ["time_activation", "time_binarization"]


def _per_channel(param: npt.ArrayLike, u: np.ndarray, name: str) -> np.ndarray:
    """Reshape a (C,) or (N, C) parameter to broadcast against u of shape (N, C, *spatial)."""
    p = np.asarray(param, dtype=np.float64)
    n_batch, channels = u.shape[:2]
    spatial = (1,) * (u.ndim - 2)
    if p.shape == (channels,):
        return p.reshape((1, channels) + spatial)
    if p.shape == (n_batch, channels):
        return p.reshape((n_batch, channels) + spatial)
    raise ValueError(
        f"{name} must have shape (C,) = ({channels},) or (N, C) = ({n_batch}, {channels}) "
        f"for u of shape {u.shape}, got {p.shape}"
    )


def _as_activation(u: npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(u, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"u must have shape (N, C, *spatial), got {arr.shape}")
    return arr


def time_binarization(u: npt.ArrayLike, thresholds: npt.ArrayLike) -> np.ndarray:
    """TB: ``sign(u - a)`` with per-channel thresholds a of shape (C,) or (N, C); float64 +-1."""
    arr = _as_activation(u)
    return sign(arr - _per_channel(thresholds, arr, "thresholds"))


def time_activation(
    u: npt.ArrayLike, zeta: npt.ArrayLike, gamma: npt.ArrayLike, slope: npt.ArrayLike
) -> np.ndarray:
    """TA: ``prelu(u + zeta; slope) + gamma``, parameters per channel, (C,) or (N, C); float64."""
    arr = _as_activation(u)
    v = arr + _per_channel(zeta, arr, "zeta")
    beta = _per_channel(slope, arr, "slope")
    return np.where(v >= 0, v, beta * v) + _per_channel(gamma, arr, "gamma")
