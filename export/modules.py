"""Export-ready stand-ins for the refiner's binary and step-conditioned modules.

:mod:`export.convert` swaps these into a *copy* of a trained refiner; ``hidiff`` is never changed.

* :class:`ExportBinaryConv` / :class:`ExportBinaryLinear`: one ``ai.hidiff`` custom node each,
  holding the +-1 weights (no latent float weights), the per-output-channel scale and a bias
  (a following batch norm folded in, else zeros).
* :class:`StepTable`: replaces an ``nn.Linear`` of the step embedding by a ``(T + 1, C)`` table
  gathered with the original step index (row ``t`` = the Linear at step ``t``, t = 0..T).
* :class:`StepIndex`: replaces the step-embedding MLP; it passes the step indices through so the
  tables downstream gather with them.
* :class:`ExportThreshold`: a time-dependent binarization whose sign is left to the binary layer
  it feeds (``sign(sign(v)) = sign(v)``): ``x - a[t]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from export.ops import BinaryConvFunction, BinaryLinearFunction
from hidiff.layers import BinaryConv2d, BinaryLinear

__all__ = [
    "ExportBinaryConv",
    "ExportBinaryLinear",
    "ExportThreshold",
    "StepIndex",
    "StepTable",
    "fold_batch_norm",
]


def fold_batch_norm(scale: Tensor, bias: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode batch norm applied to ``y * scale + bias`` into new ``(scale, bias)``.

    ``BN(v) = (v - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)``, so
    ``BN(y * s + b) = y * (s * k) + ((b - mean) * k + beta)``. Computed in float64, stored float32.
    """
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError("only a batch norm with running statistics can be folded")
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    new_scale = scale.double() * k
    new_bias = (bias.double() - mean) * k + beta
    return new_scale.float(), new_bias.float()


class ExportBinaryConv(nn.Module):
    """``conv(pad(sign(x), pad_value), W) * scale + bias`` as one ``ai.hidiff::BinaryConv`` node.

    Buffers: ``weight`` (+-1, OIHW), ``scale`` and ``bias`` (``(O,)``).
    """

    def __init__(self, conv: BinaryConv2d, bn: nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("binary convolutions with groups != 1 cannot be exported")
        scale = conv.weight_scale().float()
        if conv.bias is not None:
            bias = conv.bias.detach().float().clone()
        else:
            bias = torch.zeros_like(scale)
        self.folded_batch_norm = bn is not None
        if bn is not None:
            scale, bias = fold_batch_norm(scale, bias, bn)
        self.register_buffer("weight", conv.binarized_weight().float().contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", bias.contiguous())
        ph, pw = conv.padding
        self.kernel_shape = [int(k) for k in conv.kernel_size]
        self.strides = [int(s) for s in conv.stride]
        self.dilations = [int(d) for d in conv.dilation]
        self.pads = [int(ph), int(pw), int(ph), int(pw)]
        self.pad_value = float(conv.pad_value)

    def forward(self, x: Tensor) -> Tensor:
        return BinaryConvFunction.apply(
            x,
            self.weight,
            self.scale,
            self.bias,
            self.kernel_shape,
            self.strides,
            self.dilations,
            self.pads,
            self.pad_value,
        )

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (
            f"{i}, {o}, kernel_shape={[kh, kw]}, strides={self.strides}, pads={self.pads}, "
            f"pad_value={self.pad_value}, folded_batch_norm={self.folded_batch_norm}"
        )


class ExportBinaryLinear(nn.Module):
    """``sign(x) @ W^T * scale + bias`` as one ``ai.hidiff::BinaryLinear`` node."""

    def __init__(self, linear: BinaryLinear) -> None:
        super().__init__()
        scale = linear.weight_scale().float()
        if linear.bias is not None:
            bias = linear.bias.detach().float().clone()
        else:
            bias = torch.zeros_like(scale)
        self.register_buffer("weight", linear.binarized_weight().float().contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", bias.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return BinaryLinearFunction.apply(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"in_features={i}, out_features={o}"


class StepTable(nn.Module):
    """``table[step]``: a step-embedding ``nn.Linear`` evaluated at every step t = 0..T."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        if table.dim() != 2:
            raise ValueError(f"a step table must be (T + 1, C); got {tuple(table.shape)}")
        self.register_buffer("table", table.detach().float().contiguous())

    def forward(self, step: Tensor) -> Tensor:
        return self.table[step]

    def extra_repr(self) -> str:
        rows, channels = self.table.shape
        return f"steps=0..{rows - 1}, channels={channels}"


class StepIndex(nn.Module):
    """Stands in for the step-embedding MLP: returns the (original) step indices unchanged."""

    def forward(self, step: Tensor) -> Tensor:
        return step


class ExportThreshold(nn.Module):
    """``x - a[step]`` per channel: a time-dependent binarization feeding a binary layer, whose
    own sign binarizes it. ``thresholds(step)`` keeps the TB interface."""

    def __init__(self, table: StepTable) -> None:
        super().__init__()
        self.threshold = table

    def thresholds(self, step: Tensor) -> Tensor:
        return self.threshold(step)

    def forward(self, x: Tensor, step: Tensor) -> Tensor:
        a = self.threshold(step)
        if x.dim() == 4:
            return x - a[:, :, None, None]
        if x.dim() == 3:
            return x - a[:, None, :]
        return x - a
