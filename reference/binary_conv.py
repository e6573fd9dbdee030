"""Binary convolution and binary linear layer by XNOR-popcount (method §7).

Both operands are binarized with ``sign`` (sign(0) = +1) and packed with ``bitpack`` (bit 1 = -1,
LSB first, 32 channels per int32 word). No float multiply is used in the inner product.

Convolution (cross-correlation, as in every deep-learning framework), NCHW input ``x`` of shape
(N, C, H, W), OIHW weights ``w`` of shape (O, C, kh, kw)::

    xs = pad(sign(x), p, value=+1)
    y[n, o, i, j] = sum_{c, a, b} xs[n, c, i*sh + a*dh, j*sw + b*dw] * sign(w)[o, c, a, b]
    Ho = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1        (Wo likewise)

Computation: the sign bits of ``x`` are packed along the channel axis per pixel (NHWC words, the
LCE layout), the packed image is padded with the word 0 (all bits 0 = all channels +1, which is
exact under XNOR), and each output is a sum over the kh*kw taps of one packed dot::

    y = sum_taps (C - 2 * popcount(x_words XOR w_words))

Pad value: ``1.0`` pads with +1 (the fast, exact path). ``0.0`` is true zero padding: the +1-padded
result is corrected by subtracting, per output position, the integer sum of sign(w)[o, :, a, b]
over the taps (a, b) that read padding::

    y0[n, o, i, j] = y[n, o, i, j] - sum_{(a, b) in padding at (i, j)} S[o, a, b]
    S[o, a, b] = sum_c sign(w)[o, c, a, b] = C - 2 * popcount(w_words[o, a, b])

All of this is int64 arithmetic; the result is returned as float32 (integer-valued, exact while
|y| <= 2**24, i.e. for any layer with C*kh*kw <= 16,777,216).

Binary linear: ``y[..., o] = sum_i sign(x)[..., i] * sign(w)[o, i] = in - 2 * popcount(X XOR W)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .bitpack import bitpack, popcount, xnor_popcount_dot

__all__ = ["ALLOWED_PAD_VALUES", "binary_conv2d", "binary_linear", "conv_output_size"]

ALLOWED_PAD_VALUES = (1.0, 0.0)


def _pair(value: int | tuple[int, int], name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or (h, w) pair of ints, checking ``>= minimum``."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    out = []
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must hold integers, got {value!r}")
        if v < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        out.append(int(v))
    return out[0], out[1]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """``(size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_pad_value(pad_value: float) -> None:
    if pad_value not in ALLOWED_PAD_VALUES:
        raise ValueError(
            f"pad_value must be one of {ALLOWED_PAD_VALUES} (+1 padding or true zero padding), "
            f"got {pad_value!r}"
        )


def binary_conv2d(
    x: npt.ArrayLike,
    w: npt.ArrayLike,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    pad_value: float = 1.0,
) -> np.ndarray:
    """conv2d(pad(sign(x), pad_value), sign(w)) by XNOR-popcount; NCHW x, OIHW w, no groups.

    Returns float32 of shape (N, O, Ho, Wo) holding integers.
    """
    _check_pad_value(pad_value)
    x = np.asarray(x)
    w = np.asarray(w)
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4 axes), got shape {x.shape}")
    if w.ndim != 4:
        raise ValueError(f"w must be OIHW (4 axes), got shape {w.shape}")
    n_batch, channels, height, width = x.shape
    out_channels, w_channels, kh, kw = w.shape
    if w_channels != channels:
        raise ValueError(
            f"channel mismatch: x has {channels} input channels (axis 1) but w expects "
            f"{w_channels} (axis 1 of OIHW); groups are not supported"
        )
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    out_h = conv_output_size(height, kh, sh, ph, dh)
    out_w = conv_output_size(width, kw, sw, pw, dw)
    if out_h < 1 or out_w < 1 or kh < 1 or kw < 1:
        raise ValueError(
            f"empty output: input {height}x{width}, kernel {kh}x{kw}, stride {(sh, sw)}, "
            f"padding {(ph, pw)}, dilation {(dh, dw)} give {out_h}x{out_w}"
        )

    # Pack sign bits along channels per pixel: (N, H, W, Cw); pad spatially with word 0 (= +1).
    x_words = bitpack(np.moveaxis(x, 1, -1))
    x_words = np.pad(x_words, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=0)
    # Weights as OHWI packed along I: (O, kh, kw, Cw).
    w_words = bitpack(np.moveaxis(w, 1, -1))

    acc = np.zeros((n_batch, out_h, out_w, out_channels), dtype=np.int64)
    for a in range(kh):
        for b in range(kw):
            rows = slice(a * dh, a * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(b * dw, b * dw + sw * (out_w - 1) + 1, sw)
            tap = x_words[:, rows, cols, :]  # (N, Ho, Wo, Cw)
            acc += xnor_popcount_dot(tap[..., None, :], w_words[:, a, b, :], channels)

    if pad_value == 0.0 and (ph or pw):
        acc -= _zero_pad_correction(
            w_words, channels, (height, width), (out_h, out_w), (sh, sw), (ph, pw), (dh, dw)
        )
    return np.moveaxis(acc, -1, 1).astype(np.float32)


def _zero_pad_correction(
    w_words: np.ndarray,
    channels: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> np.ndarray:
    """Integer (Ho, Wo, O) array: sum of S[o, a, b] over the taps that read +1 padding."""
    _, kh, kw, _ = w_words.shape
    tap_sums = channels - 2 * popcount(w_words).sum(axis=-1)  # S[o, a, b] = sum_c sign(w)
    outside = []
    for axis in range(2):
        k = (kh, kw)[axis]
        # Row (or column) of the unpadded input read by output i and tap a.
        pos = (
            np.arange(out_size[axis])[:, None] * stride[axis]
            + np.arange(k)[None, :] * dilation[axis]
            - padding[axis]
        )
        outside.append((pos < 0) | (pos >= in_size[axis]))  # (Ho, kh) / (Wo, kw)
    correction = np.zeros(out_size + (w_words.shape[0],), dtype=np.int64)
    for a in range(kh):
        for b in range(kw):
            in_padding = outside[0][:, a, None] | outside[1][None, :, b]  # (Ho, Wo)
            correction += np.where(in_padding[..., None], tap_sums[:, a, b], 0)
    return correction


def binary_linear(x: npt.ArrayLike, w: npt.ArrayLike) -> np.ndarray:
    """``sign(x) @ sign(w).T`` by XNOR-popcount; x (..., in), w (out, in) -> float32 (..., out)."""
    x = np.asarray(x)
    w = np.asarray(w)
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (..., in_features)")
    if w.ndim != 2:
        raise ValueError(f"w must be (out_features, in_features), got shape {w.shape}")
    in_features = x.shape[-1]
    if w.shape[1] != in_features:
        raise ValueError(
            f"feature mismatch: x has {in_features} input features (last axis) but w expects "
            f"{w.shape[1]} (axis 1 of (out, in))"
        )
    x_words = bitpack(x)[..., None, :]  # (..., 1, words)
    w_words = bitpack(w)  # (out, words)
    return xnor_popcount_dot(x_words, w_words, in_features).astype(np.float32)
