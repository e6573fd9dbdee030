"""Binary layers of the refiner (method §7): binary conv / linear, time-dependent TB and TA.

``BinaryConv2d`` and ``BinaryLinear`` binarize their input with an activation quantizer and their
weights with :func:`hidiff.quantizers.magnitude_aware_sign`. The per-output-channel scale ``s_o`` is
applied *after* the +-1 convolution, so the convolution itself only adds integers and is exact in
float32 (that integer part is what the XNOR-popcount runtimes reproduce bit for bit).

``TimeBinarization`` (TB) and ``TimeActivation`` (TA) take the step embedding ``emb`` of shape
``(N, emb_dim)`` and turn it into per-channel thresholds / shifts. They accept

* image features ``(N, C, H, W)`` (channels on axis 1),
* token features ``(N, L, C)`` (channels *last*, as the X-Former's tokens are laid out),
* plain vectors ``(N, C)``.

``emb`` may also have batch size 1, which broadcasts over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference
from hidiff.quantizers import approx_sign, bipolar, get_quantizer, magnitude_aware_sign

__all__ = [
    "PAD_VALUES",
    "BinaryConv2d",
    "BinaryLinear",
    "TimeActivation",
    "TimeBinarization",
]

#: The pad values a binary convolution may use: +1 (exact under XNOR-popcount) or 0.
PAD_VALUES: tuple[float, ...] = reference.ALLOWED_PAD_VALUES


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


class BinaryConv2d(nn.Conv2d):
    """Binary 2-D convolution: ``conv(pad(q(x), pad_value), sign(W)) * s_o (+ bias)``.

    Arguments follow ``nn.Conv2d`` (``groups`` must be 1; ``padding`` is an int or a pair, never a
    string, and no ``padding_mode``). Keyword-only:

    ``pad_value``
        the value the *binarized* input is padded with: ``1.0`` (default; exact under XNOR-popcount,
        no correction term) or ``0.0``. Train with the pad value you export with.
    ``input_quantizer``
        ``"approx_sign"`` (default), ``"ste_sign"`` or ``None`` (the input is already +-1).

    ``s_o = mean |W[o]|`` is detached; the weight gradient is the straight-through one clipped to
    ``|W| <= 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        *,
        groups: int = 1,
        pad_value: float = 1.0,
        input_quantizer: str | None = "approx_sign",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if groups != 1:
            raise ValueError(f"BinaryConv2d supports groups=1 only (allowed: 1), got {groups!r}")
        if isinstance(pad_value, bool) or pad_value not in PAD_VALUES:
            allowed = ", ".join(repr(v) for v in PAD_VALUES)
            raise ValueError(f"pad_value must be one of {allowed}, got {pad_value!r}")
        quantize = get_quantizer(input_quantizer)
        super().__init__(
            in_channels,
            out_channels,
            _pair(kernel_size, "kernel_size"),
            stride=_pair(stride, "stride"),
            padding=_pair(padding, "padding"),
            dilation=_pair(dilation, "dilation"),
            groups=1,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.pad_value = float(pad_value)
        self.input_quantizer = input_quantizer
        self._quantize = quantize

    def binarized_weight(self) -> Tensor:
        """The +-1 weights ``sign(W)``, shape ``(O, I, kH, kW)``, detached."""
        return bipolar(self.weight.detach())

    def weight_scale(self) -> Tensor:
        """The per-output-channel scale ``s_o = mean |W[o]|``, shape ``(O,)``, detached."""
        return self.weight.detach().abs().mean(dim=(1, 2, 3))

    def forward(self, x: Tensor) -> Tensor:
        xb = self._quantize(x)
        ph, pw = self.padding
        if ph or pw:
            xb = F.pad(xb, (pw, pw, ph, ph), value=self.pad_value)
        wb, scale = magnitude_aware_sign(self.weight)
        y = F.conv2d(xb, wb, None, self.stride, 0, self.dilation)
        y = y * scale.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, pad_value={self.pad_value}, "
            f"input_quantizer={self.input_quantizer!r}"
        )


class BinaryLinear(nn.Linear):
    """Binary linear layer: ``(q(x) @ sign(W).T) * s_o (+ bias)`` over the last axis of ``x``.

    ``input_quantizer`` as for :class:`BinaryConv2d`; ``s_o = mean |W[o]|`` detached.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_quantizer: str | None = "approx_sign",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        quantize = get_quantizer(input_quantizer)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_quantizer = input_quantizer
        self._quantize = quantize

    def binarized_weight(self) -> Tensor:
        """The +-1 weights ``sign(W)``, shape ``(O, I)``, detached."""
        return bipolar(self.weight.detach())

    def weight_scale(self) -> Tensor:
        """The per-output scale ``s_o = mean |W[o]|``, shape ``(O,)``, detached."""
        return self.weight.detach().abs().mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        wb, scale = magnitude_aware_sign(self.weight)
        y = F.linear(self._quantize(x), wb) * scale.view(-1)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_quantizer={self.input_quantizer!r}"


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample, per-channel values ``v`` (N, C) to broadcast against ``x``."""
    if x.dim() == 4:  # (N, C, H, W)
        return v[:, :, None, None]
    if x.dim() == 3:  # (N, L, C) tokens, channels last
        return v[:, None, :]
    if x.dim() == 2:  # (N, C)
        return v
    raise ValueError(
        f"expected (N, C, H, W), (N, L, C) or (N, C) input, got shape {tuple(x.shape)}"
    )


def _zero_linear(emb_dim: int, channels: int) -> nn.Linear:
    layer = nn.Linear(emb_dim, channels)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TimeBinarization(nn.Module):
    """Time-dependent binarization (TB): ``approx_sign(x - a(emb))`` with per-channel ``a``.

    ``a = nn.Linear(emb_dim, channels)`` starts at zero, so the layer starts as a plain sign.
    Since the step takes only T values, export folds :meth:`thresholds` into a T x C table.
    """

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.emb_dim = emb_dim
        self.threshold = _zero_linear(emb_dim, channels)

    def thresholds(self, emb: Tensor) -> Tensor:
        """Per-sample, per-channel thresholds ``a(emb)``, shape ``(N, C)``."""
        return self.threshold(emb)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return approx_sign(x - _per_channel(self.thresholds(emb), x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, emb_dim={self.emb_dim}"


class TimeActivation(nn.Module):
    """Time-dependent activation (TA): ``prelu_beta(x + zeta(emb)) + gamma(emb)`` per channel.

    ``prelu_beta(v) = v if v >= 0 else beta * v`` with a learned per-channel slope ``beta``
    (initialised to 0.25); ``zeta`` and ``gamma`` are ``nn.Linear(emb_dim, channels)`` starting at
    zero. This is ReActNet's RPReLU with the shifts conditioned on the step.
    """

    def __init__(self, channels: int, emb_dim: int, init_slope: float = 0.25) -> None:
        super().__init__()
        self.channels = channels
        self.emb_dim = emb_dim
        self.zeta = _zero_linear(emb_dim, channels)
        self.gamma = _zero_linear(emb_dim, channels)
        self.slope = nn.Parameter(torch.full((channels,), float(init_slope)))

    def shifts(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """The input and output shifts ``(zeta(emb), gamma(emb))``, each ``(N, C)``."""
        return self.zeta(emb), self.gamma(emb)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        zeta, gamma = self.shifts(emb)
        v = x + _per_channel(zeta, x)
        if v.ndim == 4 or v.ndim == 2:  # channel axis 1: the fused PReLU kernel (fast on CPU)
            return F.prelu(v, self.slope) + _per_channel(gamma, x)
        slope = _per_channel(self.slope[None, :], x)
        return torch.where(v >= 0, v, slope * v) + _per_channel(gamma, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, emb_dim={self.emb_dim}"
