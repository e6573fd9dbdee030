"""Packed XNOR-popcount binary convolution on CPU (wrapper of the native ``edge_runtime._packed``).

Packed word format (LCE, the project's bit-packing convention): the channel axis of an NHWC
tensor (the last axis) is packed into **int32** words, ``ceil(C / 32)`` per pixel; channel ``c``
goes to word ``c // 32``, bit ``c % 32``, least significant bit first; bit 1 means -1 (``x < 0``),
bit 0 means +1 (so 0, -0.0 and NaN give +1); the unused high bits of the last word are 0 (the
kernels rely on that). ``pack_nhwc(x)`` equals ``reference.bitpack(x)``. Weights are OIHW floats
packed as OHWI words: ``(Cout, kh, kw, ceil(Cin / 32))``.

Arithmetic: at each output position the integer result is ``n * Cin - 2 * popcount(x XOR w)``
summed over taps, where with ``pad_value=1.0`` all ``kh * kw`` taps count (padding is +1, bit 0)
and with ``pad_value=0.0`` only the taps inside the image count. It equals
``reference.binary_conv2d`` exactly. The float output is ``y = float32(int) * scale[o] + bias[o]``
(two roundings, no FMA): ``scale`` carries the per-channel weight scale ``mean|W[o]|`` times a
folded batch-norm multiplier, ``bias`` the folded shift (LCE's post_activation_multiplier/bias).
With ``thresholds`` the output stays packed: bit ``o`` is ``sign(y[o] - thresholds[o])``, i.e. 1
where ``y < thresholds[o]``, so consecutive binary layers never unpack.
:meth:`PackedBinaryConv.fused` adds a float32 epilogue (residual add, per-channel add, PReLU,
per-channel add) and can emit the next layer's packed input ``sign(y - sub)``;
:func:`pack_nhwc` takes the same ``sub``.

Kernel paths (compiled into one module, chosen at import by CPU features): ``"avx512"``
(AVX-512F/BW + VPOPCNTDQ), ``"avx2"`` (VPSHUFB nibble popcount), ``"portable"`` (plain C with
128-bit vector extensions and per-channel nibble lookup tables; what aarch64 builds run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from . import _packed
from .export_format import PAD_VALUES as _PAD_VALUES

__all__ = [
    "WORD_BITS",
    "PackedBinaryConv",
    "available_paths",
    "binary_conv2d",
    "conv_output_size",
    "current_path",
    "num_words",
    "pack_nchw",
    "pack_nhwc",
    "pack_weights",
    "set_path",
]

WORD_BITS = 32


def available_paths() -> tuple[str, ...]:
    """Kernel paths this CPU runs, fastest first (always ends with ``"portable"``)."""
    return tuple(_packed.available_paths())


def current_path() -> str:
    """The default kernel path (the fastest available unless changed by :func:`set_path`)."""
    return _packed.current_path()


def set_path(name: str | None) -> None:
    """Set the default kernel path; ``None`` restores the fastest. ValueError if unsupported."""
    _packed.set_path(name)


def num_words(channels: int) -> int:
    """Packed words per pixel for ``channels`` channels: ``ceil(channels / 32)``."""
    return (int(channels) + WORD_BITS - 1) // WORD_BITS


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """``(size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1`` (PyTorch convention)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"{name} must hold integers >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _signs_f32(x: npt.ArrayLike) -> np.ndarray:
    """float32 array with the same ``x < 0`` pattern as ``x`` (exact for any real dtype)."""
    arr = np.asarray(x)
    if arr.dtype == np.float32:
        return np.ascontiguousarray(arr)
    # Converting e.g. float64 -1e-300 to float32 gives -0.0 and would flip its sign bit.
    return np.where(arr < 0, np.float32(-1.0), np.float32(1.0))


def pack_nhwc(x: npt.ArrayLike, *, sub: npt.ArrayLike | None = None,
              path: str | None = None) -> np.ndarray:
    """Pack the last axis of ``x`` (any shape, e.g. NHWC) into int32 words, ``bitpack`` layout.

    With ``sub`` (float32 ``(C,)``, or ``(N, C)`` per item of the first axis) the words are
    those of the float32 difference ``x - sub`` (rounded, then its sign: ONNX ``Sub`` then the
    binarization); ``x`` must then be float32."""
    if sub is not None:
        arr = np.ascontiguousarray(x)
        if arr.dtype != np.float32:
            raise ValueError("pack_nhwc with sub needs float32 x")
        return _packed.pack(arr, sub=np.ascontiguousarray(sub, dtype=np.float32), path=path)
    arr = _signs_f32(x)
    if arr.ndim == 0:
        raise ValueError("pack_nhwc needs at least one axis (the packed last axis)")
    return _packed.pack(arr, path=path)


def pack_nchw(x: npt.ArrayLike, *, path: str | None = None) -> np.ndarray:
    """Pack NCHW ``x`` along channels into NHWC words ``(N, H, W, ceil(C / 32))``."""
    arr = _signs_f32(x)
    if arr.ndim != 4:
        raise ValueError(f"x must be NCHW (4 axes), got shape {arr.shape}")
    return _packed.pack_nchw(arr, path=path)


def pack_weights(w: npt.ArrayLike, *, path: str | None = None) -> np.ndarray:
    """Pack OIHW float weights into OHWI words ``(O, kh, kw, ceil(I / 32))``."""
    arr = np.asarray(w)
    if arr.ndim != 4:
        raise ValueError(f"w must be OIHW (4 axes), got shape {arr.shape}")
    return pack_nhwc(np.moveaxis(arr, 1, -1), path=path)


def _channel_vector(v: npt.ArrayLike | None, name: str, out_channels: int) -> np.ndarray | None:
    if v is None:
        return None
    arr = np.ascontiguousarray(v, dtype=np.float32)
    if arr.shape != (out_channels,):
        raise ValueError(f"{name} must have shape ({out_channels},), got {arr.shape}")
    return arr


class PackedBinaryConv:
    """A binary conv layer with prepacked, kernel-prepared weights (the edge runtime's hot path).

    ``weight`` is the OIHW float weight (only its signs matter). Calls take packed NHWC int32
    input ``(N, H, W, ceil(Cin / 32))`` and return float32 NHWC ``(N, Ho, Wo, Cout)``
    (``__call__``) or packed int32 NHWC words of ``sign(y - thresholds)`` (``forward_packed``).
    """

    def __init__(
        self,
        weight: npt.ArrayLike,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        pad_value: float = 1.0,
        scale: npt.ArrayLike | None = None,
        bias: npt.ArrayLike | None = None,
        thresholds: npt.ArrayLike | None = None,
        path: str | None = None,
        threads: int = 1,
    ) -> None:
        w = np.asarray(weight)
        if w.ndim != 4:
            raise ValueError(f"weight must be OIHW (4 axes), got shape {w.shape}")
        self._init(pack_weights(w), w.shape[1], stride, padding, dilation, pad_value, scale,
                   bias, thresholds, path, threads)

    @classmethod
    def from_packed(cls, weight_words: npt.ArrayLike, in_channels: int,
                    **kwargs: object) -> PackedBinaryConv:
        """Build from packed OHWI words ``(Cout, kh, kw, ceil(in_channels / 32))``."""
        self = cls.__new__(cls)
        words = np.ascontiguousarray(weight_words)
        if words.ndim != 4 or words.dtype not in (np.int32, np.uint32):
            raise ValueError("weight_words must be int32/uint32 of shape (Cout, kh, kw, words)")
        args = {"stride": 1, "padding": 0, "dilation": 1, "pad_value": 1.0, "scale": None,
                "bias": None, "thresholds": None, "path": None, "threads": 1}
        unknown = set(kwargs) - set(args)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        args.update(kwargs)
        self._init(words, in_channels, **args)
        return self

    def _init(self, words, in_channels, stride, padding, dilation, pad_value, scale, bias,
              thresholds, path, threads) -> None:
        if pad_value not in _PAD_VALUES:
            raise ValueError(f"pad_value must be 1.0 or 0.0, got {pad_value!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self.in_channels = int(in_channels)
        self.out_channels, kh, kw, nw = words.shape
        if self.in_channels < 1 or nw != num_words(self.in_channels):
            raise ValueError(f"{nw} words per tap do not hold in_channels={in_channels}")
        self.kernel_size = (int(kh), int(kw))
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.pad_value = float(pad_value)
        self.scale = _channel_vector(scale, "scale", self.out_channels)
        self.bias = _channel_vector(bias, "bias", self.out_channels)
        self.thresholds = _channel_vector(thresholds, "thresholds", self.out_channels)
        self.threads = threads
        self.weight_words = words
        self._prepared = _packed.prepare(words, self.in_channels, kh, kw, path=path)

    @property
    def path(self) -> str:
        """The kernel path the weights are prepared for."""
        return _packed.prepared_info(self._prepared)["path"]

    def set_path(self, path: str | None) -> None:
        """Re-prepare the weights for another kernel path (``None``: the current default)."""
        kh, kw = self.kernel_size
        self._prepared = _packed.prepare(self.weight_words, self.in_channels, kh, kw, path=path)

    def output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        """NHWC float output shape for an input of ``n x h x w`` pixels."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        return (n, conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw),
                self.out_channels)

    def _run(self, x_words: npt.ArrayLike, thresholds, out) -> np.ndarray:
        kh, kw = self.kernel_size
        return _packed.bconv2d(
            np.ascontiguousarray(x_words), self._prepared, self.in_channels, kh, kw,
            *self.stride, *self.padding, *self.dilation, self.pad_value,
            scale=self.scale, bias=self.bias, thresholds=thresholds, out=out,
            threads=self.threads,
        )

    def __call__(self, x_words: npt.ArrayLike, *, out: np.ndarray | None = None) -> np.ndarray:
        """Packed NHWC input -> float32 NHWC ``int * scale + bias`` (into ``out`` if given)."""
        return self._run(x_words, None, out)

    def fused(self, x_words: npt.ArrayLike, *, residual: np.ndarray | None = None,
              zeta: np.ndarray | None = None, slope: np.ndarray | None = None,
              gamma: np.ndarray | None = None, pack_sub: np.ndarray | None = None,
              out: np.ndarray | None = None, packed_out: np.ndarray | None = None,
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``__call__`` with the native epilogue, per element in this order (float32, the ONNX
        graph's operation order): ``y + residual`` (NHWC like the output, not overlapping
        ``out``), ``+ zeta``, ``y < 0 ? y * slope : y``, ``+ gamma``; vectors ``(Cout,)`` or
        ``(N, Cout)`` (slope ``(Cout,)``), each optional. With ``pack_sub`` also returns the
        packed words of ``y_final - pack_sub`` (the next binary layer's input)."""
        kh, kw = self.kernel_size
        return _packed.bconv2d(
            np.ascontiguousarray(x_words), self._prepared, self.in_channels, kh, kw,
            *self.stride, *self.padding, *self.dilation, self.pad_value,
            scale=self.scale, bias=self.bias, out=out, threads=self.threads,
            residual=residual, zeta=zeta, slope=slope, gamma=gamma, pack_sub=pack_sub,
            packed_out=packed_out,
        )

    def forward_packed(self, x_words: npt.ArrayLike, *,
                       out: np.ndarray | None = None) -> np.ndarray:
        """Packed NHWC input -> packed int32 NHWC words of ``sign(y - thresholds)``."""
        if self.thresholds is None:
            raise ValueError("forward_packed needs thresholds (pass thresholds= at construction)")
        return self._run(x_words, self.thresholds, out)


def binary_conv2d(
    x: npt.ArrayLike,
    w: npt.ArrayLike,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    pad_value: float = 1.0,
    scale: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    path: str | None = None,
    threads: int = 1,
) -> np.ndarray:
    """``conv2d(pad(sign(x), pad_value), sign(w)) * scale + bias`` on NCHW x, OIHW w (no groups).

    Convenience entry point that packs both operands; returns float32 NCHW. Equals
    ``reference.binary_conv2d`` exactly when ``scale`` and ``bias`` are None.
    """
    x_arr, w_arr = np.asarray(x), np.asarray(w)
    if x_arr.ndim != 4 or w_arr.ndim != 4:
        raise ValueError(f"x must be NCHW and w OIHW, got shapes {x_arr.shape}, {w_arr.shape}")
    if x_arr.shape[1] != w_arr.shape[1]:
        raise ValueError(
            f"channel mismatch: x has {x_arr.shape[1]} channels, w expects {w_arr.shape[1]}"
        )
    layer = PackedBinaryConv(w_arr, stride=stride, padding=padding, dilation=dilation,
                             pad_value=pad_value, scale=scale, bias=bias, path=path,
                             threads=threads)
    y = layer(pack_nchw(x_arr, path=path))
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
