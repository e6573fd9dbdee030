"""The binarized Bernoulli diffusion refiner, BBDM (method §8), and its full-precision twin.

Data flow for one step (``forward(x, y_t, prior, features, t)``):

* step embedding ``emb = StepEmbedding(t)``, ``t`` the ORIGINAL step indices 1..T;
* stem: ``BN(stem_static(concat[x, p]) + stem_dynamic(y_t))``, two real 3x3 convs summed so the
  image/prior half is computed once per image (``use_image=False`` drops ``x``);
* encoder level i (stride 2**i, ``level_channels[i]`` channels): a binary down block (i > 0), a
  feature-injection block where the segmentor has a feature at that stride (not at the bottleneck
  when the X-Former is on), then binary basic blocks;
* bottleneck X-Former between the refiner map and the segmentor feature at the bottleneck stride
  (the nearest stride, average-pooled / upsampled, when the segmentor has none there), brought to
  the bottleneck width by a real 1x1 conv;
* decoder: binary up blocks with the encoder skips, then basic blocks;
* real-valued head (3x3 conv, zero-initialised: the initial output logits are 0, i.e. 0.5 after
  the sigmoid the diffusion code applies) -> K logits.

``precompute(x, prior, features)`` returns every tensor that depends neither on ``y_t`` nor ``t``
(stem_static output, ``conv_f`` of each injection block, the X-Former's segmentor tokens and their
keys/values) and ``forward_step(cache, y_t, t)`` finishes the step; ``forward`` is literally
``forward_step(precompute(...), ...)`` so the two agree exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hidiff.blocks import BasicBlock, DownBlock, InjectionBlock, UpBlock, init_conv
from hidiff.config import RefinerConfig
from hidiff.embedding import StepEmbedding
from hidiff.xformer import XFormer, XFormerCache

__all__ = ["BinaryRefiner", "RefinerCache"]


class RefinerCache(NamedTuple):
    """Time-independent tensors of one image batch (see :meth:`BinaryRefiner.precompute`)."""

    stem: Tensor
    injections: tuple[Tensor | None, ...]  # per encoder level, conv_f(feature) or None
    xformer: XFormerCache | None


class _EncoderLevel(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        feature_channels: int | None,
        blocks: int,
        emb_dim: int,
        *,
        downsample: bool,
        binary: bool,
        pad_value: float,
    ) -> None:
        super().__init__()
        kw = dict(binary=binary, pad_value=pad_value)
        self.down = DownBlock(cin, cout, emb_dim, **kw) if downsample else None
        self.inject = (
            InjectionBlock(cout, feature_channels, emb_dim, **kw)
            if feature_channels is not None
            else None
        )
        self.blocks = nn.ModuleList([BasicBlock(cout, emb_dim, **kw) for _ in range(blocks)])

    def forward(self, h: Tensor, static: Tensor | None, emb: Tensor) -> Tensor:
        if self.down is not None:
            h = self.down(h, emb)
        if self.inject is not None:
            h = self.inject.forward_cached(h, static, emb)
        for block in self.blocks:
            h = block(h, emb)
        return h


class _DecoderLevel(nn.Module):
    def __init__(
        self, cin: int, cout: int, blocks: int, emb_dim: int, *, binary: bool, pad_value: float
    ) -> None:
        super().__init__()
        kw = dict(binary=binary, pad_value=pad_value)
        self.up = UpBlock(cin, cout, cout, emb_dim, **kw)
        self.blocks = nn.ModuleList([BasicBlock(cout, emb_dim, **kw) for _ in range(blocks - 1)])

    def forward(self, h: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        h = self.up(h, skip, emb)
        for block in self.blocks:
            h = block(h, emb)
        return h


class BinaryRefiner(nn.Module):
    """BBDM: the binarized refiner g(x, y_t, p, features, t) -> K logits.

    Args:
        config: the refiner settings.
        num_classes: K, channels of ``y_t``, ``prior`` and the output.
        image_channels: channels of ``x``.
        feature_channels / feature_strides: what the segmentor provides (its attributes).
        binary: ``False`` builds the full-precision twin (same parameter names and shapes);
            ``None`` (default) follows ``config.binary``.
    """

    def __init__(
        self,
        config: RefinerConfig,
        *,
        num_classes: int,
        image_channels: int,
        feature_channels: tuple[int, ...],
        feature_strides: tuple[int, ...],
        binary: bool | None = None,
    ) -> None:
        super().__init__()
        if len(feature_channels) != len(feature_strides):
            raise ValueError("feature_channels and feature_strides must have the same length")
        binary = config.binary if binary is None else bool(binary)
        self.config = config
        self.binary = binary
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.feature_channels = tuple(feature_channels)
        self.feature_strides = tuple(feature_strides)
        ch = config.level_channels
        emb_dim = config.emb_dim
        kw = dict(binary=binary, pad_value=config.pad_value)

        self.embed = StepEmbedding(emb_dim, config.emb_freq_dim)
        static_in = num_classes + (image_channels if config.use_image else 0)
        self.stem_static = init_conv(nn.Conv2d(static_in, ch[0], 3, padding=1, bias=True))
        self.stem_dynamic = init_conv(nn.Conv2d(num_classes, ch[0], 3, padding=1, bias=False))
        self.stem_norm = nn.BatchNorm2d(ch[0])

        by_stride = {s: i for i, s in enumerate(self.feature_strides)}
        last = config.num_levels - 1
        self.injected: tuple[int | None, ...] = tuple(
            None if (i == last and config.use_xformer) else by_stride.get(2**i)
            for i in range(config.num_levels)
        )
        self.encoder = nn.ModuleList(
            _EncoderLevel(
                ch[max(i - 1, 0)],
                ch[i],
                None if self.injected[i] is None else self.feature_channels[self.injected[i]],
                config.blocks_per_level,
                emb_dim,
                downsample=i > 0,
                **kw,
            )
            for i in range(config.num_levels)
        )

        self.xformer: XFormer | None = None
        self.xformer_feature: int | None = None
        if config.use_xformer:
            if not self.feature_strides:
                raise ValueError("the X-Former needs at least one segmentor feature")
            bottleneck = 2**last
            self.xformer_feature = min(
                range(len(self.feature_strides)),
                key=lambda j: (
                    abs(self.feature_strides[j].bit_length() - last - 1),
                    -self.feature_strides[j],
                ),
            )
            self._xformer_stride = (self.feature_strides[self.xformer_feature], bottleneck)
            self.xformer_proj = nn.Conv2d(
                self.feature_channels[self.xformer_feature], ch[last], 1, bias=True
            )
            init_conv(self.xformer_proj)
            self.xformer = XFormer(
                ch[last],
                config.xformer_heads,
                mlp_ratio=config.xformer_mlp_ratio,
                binary=binary,
                attention=config.attention,
                threshold=config.attention_threshold,
            )

        self.decoder = nn.ModuleList(
            _DecoderLevel(ch[i + 1], ch[i], config.blocks_per_level, emb_dim, **kw)
            for i in reversed(range(last))
        )
        self.head = nn.Conv2d(ch[0], num_classes, 3, padding=1, bias=True)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # -- the time-independent part ------------------------------------------------------------
    def _resample_bottleneck_feature(self, f: Tensor) -> Tensor:
        src, dst = self._xformer_stride
        if src < dst:
            return F.avg_pool2d(f, dst // src)
        if src > dst:
            return F.interpolate(f, scale_factor=float(src // dst), mode="nearest")
        return f

    def precompute(self, x: Tensor, prior: Tensor, features: tuple[Tensor, ...]) -> RefinerCache:
        """Every tensor of a step that depends on neither ``y_t`` nor ``t``."""
        if len(features) != len(self.feature_strides):
            raise ValueError(
                f"expected {len(self.feature_strides)} segmentor features, got {len(features)}"
            )
        stem_in = torch.cat([x, prior], dim=1) if self.config.use_image else prior
        stem = self.stem_static(stem_in)
        injections = tuple(
            None if j is None else level.inject.static(features[j])
            for level, j in zip(self.encoder, self.injected, strict=True)
        )
        xcache = None
        if self.xformer is not None:
            f = self._resample_bottleneck_feature(features[self.xformer_feature])
            xcache = self.xformer.precompute(self.xformer_proj(f))
        return RefinerCache(stem, injections, xcache)

    # -- one step -----------------------------------------------------------------------------
    def forward_step(self, cache: RefinerCache, y_t: Tensor, t: Tensor) -> Tensor:
        """Logits (N, K, H, W) for ``y_t`` at original step indices ``t`` (N,) given ``cache``."""
        if t.dim() != 1 or t.is_floating_point():
            raise ValueError(
                f"t must be an integer tensor of shape (N,); got {t.dtype} {tuple(t.shape)}"
            )
        emb = self.embed(t)
        h = self.stem_norm(cache.stem + self.stem_dynamic(y_t))
        skips = []
        for level, static in zip(self.encoder, cache.injections, strict=True):
            h = level(h, static, emb)
            skips.append(h)
        if self.xformer is not None:
            h, _ = self.xformer.forward_cached(h, cache.xformer)
        for j, level in enumerate(self.decoder):
            h = level(h, skips[-2 - j], emb)
        return self.head(h)

    def forward(
        self,
        x: Tensor,
        y_t: Tensor,
        prior: Tensor,
        features: tuple[Tensor, ...],
        t: Tensor,
    ) -> Tensor:
        """Logits (N, K, H, W); the diffusion code applies the sigmoid."""
        return self.forward_step(self.precompute(x, prior, features), y_t, t)
