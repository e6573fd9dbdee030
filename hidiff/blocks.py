"""Refiner building blocks (method §7, §8): binary basic / down / up blocks, feature injection.

Every block takes ``binary``. ``binary=True`` uses the 1-bit layers of :mod:`hidiff.layers`;
``binary=False`` builds the *same* modules with the same parameter names and shapes, real-valued:
``nn.Conv2d`` (bias-free, zero padding) instead of ``BinaryConv2d``, and the time-dependent
binarization (TB) becomes the identity on ``x - a(emb)`` (the threshold is still subtracted, no
sign). That is the full-precision twin.

All step conditioning is a per-layer ``nn.Linear`` of the step embedding ``emb`` (N, emb_dim), so
export can fold each into a T x C table. Binary convs get their input already bipolar from TB
(``input_quantizer=None``). Real-valued layers stay where binarization hurts (shortcut / channel
changing 1x1 convs, the layers that bring in segmentor features, normalisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hidiff.layers import BinaryConv2d, TimeActivation, TimeBinarization

__all__ = [
    "BasicBlock",
    "DownBlock",
    "InjectionBlock",
    "UpBlock",
    "conv3x3",
    "init_conv",
    "time_binarize",
]


def init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Explicit init: weights N(0, 1/fan_in) (BN follows every conv here), bias zero."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def conv3x3(cin: int, cout: int, *, stride: int = 1, binary: bool, pad_value: float) -> nn.Conv2d:
    """A bias-free 3x3 conv, padding 1: ``BinaryConv2d`` (input already +-1) or ``nn.Conv2d``."""
    if binary:
        conv: nn.Conv2d = BinaryConv2d(
            cin, cout, 3, stride=stride, padding=1, pad_value=pad_value, input_quantizer=None
        )
    else:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return init_conv(conv)


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return init_conv(nn.Conv2d(cin, cout, 1, bias=False))


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


def time_binarize(tb: TimeBinarization, x: Tensor, emb: Tensor, binary: bool) -> Tensor:
    """TB: ``sign(x - a(emb))`` when ``binary``, else ``x - a(emb)`` (the real twin)."""
    if binary:
        return tb(x, emb)
    return x - tb.thresholds(emb)[:, :, None, None]


class BasicBlock(nn.Module):
    """TB -> 3x3 conv (binary) -> BN -> + x -> TA; channels unchanged."""

    def __init__(self, channels: int, emb_dim: int, *, binary: bool, pad_value: float = 1.0):
        super().__init__()
        self.binary = binary
        self.tb = TimeBinarization(channels, emb_dim)
        self.conv = conv3x3(channels, channels, binary=binary, pad_value=pad_value)
        self.bn = _bn(channels)
        self.ta = TimeActivation(channels, emb_dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        u = self.bn(self.conv(time_binarize(self.tb, x, emb, self.binary)))
        return self.ta(u + x, emb)


class DownBlock(nn.Module):
    """TB -> stride-2 3x3 conv (binary) -> BN -> + shortcut -> TA.

    Shortcut: 2x2 average pool, then (when the channels change) a real 1x1 conv + BN.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, *, binary: bool, pad_value: float = 1.0):
        super().__init__()
        self.binary = binary
        self.tb = TimeBinarization(cin, emb_dim)
        self.conv = conv3x3(cin, cout, stride=2, binary=binary, pad_value=pad_value)
        self.bn = _bn(cout)
        if cin != cout:
            self.shortcut: nn.Module = nn.Sequential(_conv1x1(cin, cout), _bn(cout))
        else:
            self.shortcut = nn.Identity()
        self.ta = TimeActivation(cout, emb_dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        u = self.bn(self.conv(time_binarize(self.tb, x, emb, self.binary)))
        return self.ta(u + self.shortcut(F.avg_pool2d(x, 2)), emb)


class UpBlock(nn.Module):
    """Nearest x2 upsample, concat skip, real 1x1 conv + BN to ``cout``, then a basic block."""

    def __init__(
        self, cin: int, cskip: int, cout: int, emb_dim: int, *, binary: bool, pad_value: float = 1.0
    ):
        super().__init__()
        self.fuse = _conv1x1(cin + cskip, cout)
        self.bn = _bn(cout)
        self.block = BasicBlock(cout, emb_dim, binary=binary, pad_value=pad_value)

    def forward(self, x: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.bn(self.fuse(torch.cat([x, skip], dim=1)))
        return self.block(h, emb)


class InjectionBlock(nn.Module):
    """Brings a segmentor feature into the refiner at one stride (real-valued, step-conditioned).

    ``u = FiLM_emb(BN(conv_h(h) + conv_f(feat)))``, ``out = block(h + u)`` with ``block`` a binary
    basic block and FiLM ``u * (1 + scale(emb)) + shift(emb)`` (zero-initialised, so it starts as
    the identity). ``conv_h`` is a 1x1 conv (runs every step), ``conv_f`` a 3x3 conv over the
    feature: it does not depend on y_t or t, so :meth:`static` is computed once per image and
    :meth:`forward_cached` reuses it (method §9). The two convs are summed, never one conv over a
    concatenation, which is what makes the split exact. ``h + u`` keeps an identity path.
    """

    def __init__(
        self,
        channels: int,
        feature_channels: int,
        emb_dim: int,
        *,
        binary: bool,
        pad_value: float = 1.0,
    ):
        super().__init__()
        self.conv_h = _conv1x1(channels, channels)
        self.conv_f = init_conv(nn.Conv2d(feature_channels, channels, 3, padding=1, bias=False))
        self.bn = _bn(channels)
        self.film = nn.Linear(emb_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.block = BasicBlock(channels, emb_dim, binary=binary, pad_value=pad_value)

    def static(self, feature: Tensor) -> Tensor:
        """The time-independent half, ``conv_f(feature)``."""
        return self.conv_f(feature)

    def forward_cached(self, h: Tensor, static: Tensor, emb: Tensor) -> Tensor:
        u = self.bn(self.conv_h(h) + static)
        scale, shift = self.film(emb).chunk(2, dim=1)
        u = u * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.block(h + u, emb)

    def forward(self, h: Tensor, feature: Tensor, emb: Tensor) -> Tensor:
        return self.forward_cached(h, self.static(feature), emb)
