"""The X-Former (cross transformer) at the refiner's bottleneck (method §8).

Two cross-attention blocks between the refiner (diffusion) tokens ``f_d`` and the segmentor tokens
``f_p``, both (N, L, E) with L = H_b * W_b:

1. ``f_p' = block1(queries from f_d, keys/values from f_p)``, residual on the segmentor stream;
2. ``f_d' = block2(queries from f_p', keys/values from f_d)``, residual on the diffusion stream.

Each block: LayerNorm -> Q/K/V projections (``BinaryLinear`` with ApproxSign inputs when binary,
``nn.Linear`` in the real twin) -> multi-head attention -> real output projection -> residual ->
LayerNorm -> MLP (binary/real expansion, GELU, real contraction) -> residual. There is no positional
encoding: the blocks are equivariant to any permutation applied to both token streams alike (the
refiner's convolutions carry the position information).

Attention maps (``attention=``):

``"softmax"``
    ``P = softmax(q k^T / sqrt(d))``.
``"hard"`` (binarized)
    forward ``H = 1[P > threshold * max_row(P)]`` (threshold 0.35) on the softmax probabilities,
    then **row-normalised**, ``H / sum_row(H)``: each query averages the values of the keys it
    selects, which keeps the output on the scale of the softmax's convex combination (a raw 0/1
    map would scale the output with the number of selected keys). Every row selects at least its
    maximum, so the sum is >= 1. Equivalently ``s_j - max(s) > ln(threshold)`` on the scores, up
    to rounding. Backward: the softmax's gradient, straight through the hard map
    (:class:`HardAttentionMap`).

Tokens: ``(N, E, H, W) -> x.flatten(2).transpose(1, 2)``; back
``tokens.transpose(1, 2).reshape(N, E, H, W)`` (:func:`to_tokens` / :func:`from_tokens`; the
official code reshapes without the transpose, which scrambles the positions).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hidiff.layers import BinaryLinear

__all__ = [
    "Attention",
    "CrossAttentionBlock",
    "HardAttentionMap",
    "XFormer",
    "XFormerCache",
    "from_tokens",
    "hard_attention",
    "to_tokens",
]


def to_tokens(x: Tensor) -> Tensor:
    """(N, E, H, W) -> (N, H*W, E); token ``i * W + j`` is position (i, j)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """(N, H*W, E) -> (N, E, H, W), the inverse of :func:`to_tokens`."""
    n, length, e = tokens.shape
    if length != height * width:
        raise ValueError(f"{length} tokens cannot form a {height} x {width} map")
    return tokens.transpose(1, 2).reshape(n, e, height, width)


def _hard_map(probs: Tensor, threshold: float) -> Tensor:
    hard = (probs > threshold * probs.amax(dim=-1, keepdim=True)).to(probs.dtype)
    return hard / hard.sum(dim=-1, keepdim=True)


class HardAttentionMap(torch.autograd.Function):
    """Forward: row-normalised ``1[P > threshold * max_row P]``; backward: identity w.r.t. ``P``
    (so, composed with the softmax that produced ``P``, the softmax's gradient)."""

    @staticmethod
    def forward(ctx, probs: Tensor, threshold: float) -> Tensor:
        return _hard_map(probs, threshold)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def hard_attention(probs: Tensor, threshold: float) -> Tensor:
    """The binarized attention map of ``probs`` (softmax output), straight-through gradient."""
    if torch.is_grad_enabled() and probs.requires_grad:
        return HardAttentionMap.apply(probs, threshold)
    return _hard_map(probs, threshold)


class Attention(nn.Module):
    """Parameter-free multi-head attention core over (N, heads, L, d) tensors (a module so that
    MAC counting can hook it)."""

    def __init__(self, mode: str = "hard", threshold: float = 0.35) -> None:
        super().__init__()
        if mode not in ("hard", "softmax"):
            raise ValueError(f"attention mode must be 'hard' or 'softmax'; got {mode!r}")
        self.mode = mode
        self.threshold = float(threshold)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        probs = torch.softmax(scores, dim=-1)
        if self.mode == "hard":
            probs = hard_attention(probs, self.threshold)
        return torch.matmul(probs, v)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, threshold={self.threshold}"


def _projection(cin: int, cout: int, binary: bool) -> nn.Linear:
    if binary:
        return BinaryLinear(cin, cout, input_quantizer="approx_sign")
    return nn.Linear(cin, cout, bias=False)


class CrossAttentionBlock(nn.Module):
    """Cross-attention block updating the key/value stream ``x_kv`` with queries from ``x_q``.

    ``x_q`` and ``x_kv`` are (N, L, E) over the same L positions: the output of query i is added
    to token i of ``x_kv``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: int = 2,
        binary: bool = True,
        attention: str = "hard",
        threshold: float = 0.35,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim = dim
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = _projection(dim, dim, binary)
        self.k = _projection(dim, dim, binary)
        self.v = _projection(dim, dim, binary)
        self.attn = Attention(attention, threshold)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.fc1 = _projection(dim, mlp_ratio * dim, binary)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Explicit init: linear weights truncated N(0, 0.02^2), biases 0, LayerNorm 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _split(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.heads, self.dim // self.heads).transpose(1, 2)

    def keys_values(self, x_kv: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of ``x_kv``, each (N, heads, L, d)."""
        n = self.norm_kv(x_kv)
        return self._split(self.k(n)), self._split(self.v(n))

    def forward(self, x_q: Tensor, x_kv: Tensor, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if x_q.shape[-2:] != x_kv.shape[-2:]:
            raise ValueError(
                f"query and key/value tokens must match in (L, E): {tuple(x_q.shape)} vs "
                f"{tuple(x_kv.shape)}"
            )
        k, v = self.keys_values(x_kv) if kv is None else kv
        q = self._split(self.q(self.norm_q(x_q)))
        a = self.attn(q, k, v)  # (N, heads, L, d)
        n, _, length, _ = a.shape
        out = x_kv + self.proj(a.transpose(1, 2).reshape(n, length, self.dim))
        return out + self.fc2(self.act(self.fc1(self.norm_mlp(out))))


class XFormerCache(NamedTuple):
    """The time-independent part of an X-Former call: segmentor tokens and block 1's K/V."""

    tokens_p: Tensor
    kv_p: tuple[Tensor, Tensor]


class XFormer(nn.Module):
    """Two cross-attention blocks: ``(f_d, f_p) -> f_p' -> f_d'`` over (N, E, H, W) maps."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: int = 2,
        binary: bool = True,
        attention: str = "hard",
        threshold: float = 0.35,
    ) -> None:
        super().__init__()
        kw = dict(mlp_ratio=mlp_ratio, binary=binary, attention=attention, threshold=threshold)
        self.seg_block = CrossAttentionBlock(dim, heads, **kw)  # block 1: updates f_p
        self.diff_block = CrossAttentionBlock(dim, heads, **kw)  # block 2: updates f_d

    def precompute(self, f_p: Tensor) -> XFormerCache:
        """What depends only on the segmentor map ``f_p`` (N, E, H, W)."""
        tokens_p = to_tokens(f_p)
        return XFormerCache(tokens_p, self.seg_block.keys_values(tokens_p))

    def forward_cached(self, f_d: Tensor, cache: XFormerCache) -> tuple[Tensor, Tensor]:
        """``(f_d', f_p')`` as (N, E, H, W) maps."""
        _, _, height, width = f_d.shape
        tokens_d = to_tokens(f_d)
        tokens_p = self.seg_block(tokens_d, cache.tokens_p, kv=cache.kv_p)
        tokens_d = self.diff_block(tokens_p, tokens_d)
        return from_tokens(tokens_d, height, width), from_tokens(tokens_p, height, width)

    def forward(self, f_d: Tensor, f_p: Tensor) -> tuple[Tensor, Tensor]:
        if f_d.shape[1:] != f_p.shape[1:]:
            raise ValueError(
                f"f_d and f_p must have the same (E, H, W): {tuple(f_d.shape)} vs "
                f"{tuple(f_p.shape)}"
            )
        return self.forward_cached(f_d, self.precompute(f_p))
