"""Step embedding: sinusoidal features of the original step index t, then a real-valued MLP.

The network is always told the *original* step index ``t`` in 1..T (after respacing too), as an
integer. The embedding is real-valued (method §7: the step-embedding MLP stays full precision).
Because ``t`` takes only T values, :meth:`StepEmbedding.table` evaluates it once for every step;
export folds the per-layer linear maps of the embedding into T x C tables.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["StepEmbedding", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period ** (-k / (dim/2))``, k < dim/2.

    ``t``: (N,) integer (or float) step indices; returns (N, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"dim must be even; got {dim}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (N,); got {tuple(t.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class StepEmbedding(nn.Module):
    """``t`` (N,) LongTensor of original step indices -> (N, emb_dim).

    ``Linear(freq_dim, emb_dim) -> SiLU -> Linear(emb_dim, emb_dim)`` over the sinusoidal
    features. Weights: default (Kaiming-uniform) init, biases zero, set explicitly.
    """

    def __init__(self, emb_dim: int, freq_dim: int = 128, max_period: float = 10000.0) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            raise ValueError("t must be an integer tensor of original step indices (1..T)")
        return self.mlp(sinusoidal_embedding(t, self.freq_dim, self.max_period))

    def table(self, num_steps: int) -> Tensor:
        """Embeddings of t = 1..num_steps, shape (num_steps, emb_dim); row j-1 is step j."""
        t = torch.arange(1, num_steps + 1, device=self.mlp[0].weight.device)
        return self.forward(t)

    def extra_repr(self) -> str:
        return f"emb_dim={self.emb_dim}, freq_dim={self.freq_dim}"
