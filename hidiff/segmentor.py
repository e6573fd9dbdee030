"""The segmentor interface and a plain real-valued U-Net segmentor.

HiDiff works with any segmentor (method §6). What the refiner and the training loop need from it
is the :class:`Segmentor` protocol: logits ``(N, K, H, W)``, multi-scale features at known strides,
and the prior p = :func:`prior_from_logits` (sigmoid for K = 1, softmax over classes for K > 1;
never a softmax over a single channel, which would make p identically 1, method §1).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hidiff.config import SegmentorConfig

__all__ = [
    "Segmentor",
    "SegmentorOutput",
    "UNetSegmentor",
    "prior_from_logits",
]


class SegmentorOutput(NamedTuple):
    """``logits`` (N, K, H, W); ``features[i]`` (N, feature_channels[i], H/s_i, W/s_i)."""

    logits: Tensor
    features: tuple[Tensor, ...]


def prior_from_logits(logits: Tensor) -> Tensor:
    """The prior p: ``sigmoid`` when K = 1, ``softmax`` over the channel axis when K > 1."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, K, ...); got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


@runtime_checkable
class Segmentor(Protocol):
    """What HiDiff needs from a segmentor (an ``nn.Module``).

    Attributes:
        num_classes: K, the mask channels (1 for a binary task).
        feature_channels: channels C_i of ``features[i]``.
        feature_strides: stride s_i of ``features[i]`` (a power of two), strictly increasing.

    ``forward(x)`` maps an image batch (N, C_img, H, W) to a :class:`SegmentorOutput`;
    ``prior_from_logits(logits)`` turns the logits into the prior p in (0, 1).
    """

    num_classes: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]

    def forward(self, x: Tensor) -> SegmentorOutput: ...

    def prior_from_logits(self, logits: Tensor) -> Tensor: ...


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


class _Up(nn.Module):
    """2x upsampling (bilinear + 1x1 conv, or transposed conv), skip concat, DoubleConv."""

    def __init__(self, cin: int, cskip: int, cout: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.up = nn.Conv2d(cin, cout, 1)
        nn.init.kaiming_normal_(self.up.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.up.bias)
        self.conv = DoubleConv(cout + cskip, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.mode == "transpose":
            x = self.up(x)
        else:
            x = self.up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.conv(torch.cat([x, skip], dim=1))


class UNetSegmentor(nn.Module):
    """Real-valued U-Net: encoder of DoubleConv + max-pool, decoder of up + skip concat.

    Returns the logits and the decoder features at ``config.strides`` (stride 2**depth is the
    bottleneck). All convs are initialised explicitly (Kaiming normal, zero biases; BN 1/0).
    """

    def __init__(self, config: SegmentorConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        ch = config.level_channels()
        self.encoder = nn.ModuleList(
            [DoubleConv(config.in_channels, ch[0])]
            + [DoubleConv(ch[i - 1], ch[i]) for i in range(1, config.depth + 1)]
        )
        # decoder[j] produces level depth-1-j from level depth-j.
        self.decoder = nn.ModuleList(
            [_Up(ch[i + 1], ch[i], ch[i], config.up_mode) for i in reversed(range(config.depth))]
        )
        self.head = nn.Conv2d(ch[0], config.num_classes, 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.feature_strides: tuple[int, ...] = config.strides
        self.feature_channels: tuple[int, ...] = tuple(
            ch[s.bit_length() - 1] for s in self.feature_strides
        )

    def forward(self, x: Tensor) -> SegmentorOutput:
        depth = self.config.depth
        if x.shape[-1] % 2**depth or x.shape[-2] % 2**depth:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by 2**depth = {2**depth}"
            )
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            if i:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        by_stride = {2**depth: h}
        for j, up in enumerate(self.decoder):
            level = depth - 1 - j
            h = up(h, skips[level])
            by_stride[2**level] = h
        logits = self.head(h)
        return SegmentorOutput(logits, tuple(by_stride[s] for s in self.feature_strides))

    def prior_from_logits(self, logits: Tensor) -> Tensor:
        return prior_from_logits(logits)
