"""Model size and cost: parameters (1-bit vs real) and multiply-accumulates (binary vs real).

* :func:`count_parameters` splits a module's parameters: the weights of ``BinaryConv2d`` /
  ``BinaryLinear`` are 1-bit, everything else (their scales are derived, not stored) is real.
* :func:`count_macs` counts per-sample MACs with forward hooks on a dummy input at
  ``config.image_size``: convolutions and linears from their shapes, the X-Former's attention
  products (QK^T and AV) from its :class:`~hidiff.xformer.Attention` modules. Binary layers count
  as binary MACs (XNOR-popcount), all others as real. Element-wise work (norms, TB/TA, pooling) is
  not counted. For the refiner, ``part="step"`` is one reverse step with the time-independent
  tensors cached (method §9), ``"precompute"`` that once-per-image part, ``"full"`` both.
* :func:`describe` formats both nets of a config as a table; ``python -m hidiff.describe [preset
  ...]`` prints it for the paper preset and the CPU presets.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hidiff.config import ModelConfig, list_presets, preset
from hidiff.layers import BinaryConv2d, BinaryLinear
from hidiff.refiner import BinaryRefiner
from hidiff.segmentor import UNetSegmentor
from hidiff.xformer import Attention

__all__ = [
    "MacCount",
    "ParamCount",
    "build_models",
    "count_macs",
    "count_parameters",
    "describe",
    "main",
]

_BINARY_TYPES = (BinaryConv2d, BinaryLinear)


@dataclass(frozen=True)
class ParamCount:
    binary: int  # 1-bit weights
    real: int  # float parameters

    @property
    def total(self) -> int:
        return self.binary + self.real

    @property
    def storage_bytes(self) -> float:
        """Binary weights packed at 1 bit, real ones as float32."""
        return self.binary / 8 + 4 * self.real


@dataclass(frozen=True)
class MacCount:
    binary: int  # XNOR-popcount multiply-accumulates
    real: int  # floating-point multiply-accumulates

    @property
    def total(self) -> int:
        return self.binary + self.real

    def __add__(self, other: MacCount) -> MacCount:
        return MacCount(self.binary + other.binary, self.real + other.real)


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> ParamCount:
    """Parameters of ``module`` split into 1-bit (binary layers' weights) and real."""
    binary_ids = {id(m.weight) for m in module.modules() if isinstance(m, _BINARY_TYPES)}
    binary = real = 0
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in binary_ids:
            binary += p.numel()
        else:
            real += p.numel()
    return ParamCount(binary, real)


def _layer_macs(module: nn.Module, inputs: tuple, output: Tensor) -> tuple[int, bool] | None:
    """(MACs for the whole batch, is_binary), or None when ``module`` is not counted."""
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        x = inputs[0]
        return x.numel() * module.out_channels * kh * kw // module.groups, False
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = module.in_channels // module.groups * kh * kw
        return output.numel() * per_out, isinstance(module, BinaryConv2d)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features, isinstance(module, BinaryLinear)
    if isinstance(module, Attention):
        q, k, _ = inputs  # (N, heads, Lq, d), (N, heads, Lk, d)
        n, heads, lq, d = q.shape
        return 2 * n * heads * lq * k.shape[-2] * d, False
    return None


def _count(model: nn.Module, run: Callable[[], object], batch: int) -> MacCount:
    totals = {True: 0, False: 0}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        r = _layer_macs(module, inputs, output)
        if r is not None:
            totals[r[1]] += r[0]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return MacCount(totals[True] // batch, totals[False] // batch)


def _dummy_inputs(model: BinaryRefiner, config: ModelConfig, batch: int):
    s = config.image_size
    k = model.num_classes
    x = torch.zeros(batch, model.image_channels, s, s)
    prior = torch.full((batch, k, s, s), 0.5)
    y_t = torch.zeros(batch, k, s, s)
    feats = tuple(
        torch.zeros(batch, c, s // st, s // st)
        for c, st in zip(model.feature_channels, model.feature_strides, strict=True)
    )
    t = torch.full((batch,), config.diffusion.num_steps, dtype=torch.long)
    return x, y_t, prior, feats, t


def count_macs(
    model: nn.Module, config: ModelConfig, *, part: str = "step", batch: int = 1
) -> MacCount:
    """Per-sample MACs of ``model`` (a :class:`BinaryRefiner` or a segmentor) at the config's
    image size. For a refiner ``part`` is ``"step"`` (one reverse step, time-independent tensors
    cached), ``"precompute"`` (once per image) or ``"full"`` (an uncached forward)."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, BinaryRefiner):
            x, y_t, prior, feats, t = _dummy_inputs(model, config, batch)
            if part == "step":
                with torch.no_grad():
                    cache = model.precompute(x, prior, feats)
                return _count(model, lambda: model.forward_step(cache, y_t, t), batch)
            if part == "precompute":
                return _count(model, lambda: model.precompute(x, prior, feats), batch)
            if part == "full":
                return _count(model, lambda: model(x, y_t, prior, feats, t), batch)
            raise ValueError(f"part must be 'step', 'precompute' or 'full'; got {part!r}")
        s = config.image_size
        x = torch.zeros(batch, config.in_channels, s, s)
        return _count(model, lambda: model(x), batch)
    finally:
        model.train(was_training)


def build_models(config: ModelConfig, *, binary: bool | None = None):
    """``(UNetSegmentor, BinaryRefiner)`` for ``config`` (refiner twin with ``binary=False``)."""
    seg = UNetSegmentor(config.segmentor)
    ref = BinaryRefiner(
        config.refiner,
        num_classes=config.num_classes,
        image_channels=config.in_channels,
        feature_channels=seg.feature_channels,
        feature_strides=seg.feature_strides,
        binary=binary,
    )
    return seg, ref


def _m(v: float) -> str:
    return f"{v / 1e6:9.2f} M"


def _g(v: float) -> str:
    return f"{v / 1e9:9.3f} G"


def describe(config: ModelConfig) -> str:
    """A table of parameters and per-sample MACs of the config's segmentor and refiner."""
    seg, ref = build_models(config)
    rc = config.refiner
    lines = [
        f"preset {config.preset!r}: {config.image_size}x{config.image_size}, "
        f"K={config.num_classes}, "
        f"refiner base {rc.base_channels} x {list(rc.channel_mults)} "
        f"(strides 1..{rc.strides[-1]}), {rc.blocks_per_level} block(s)/level, "
        f"binary={ref.binary}; segmentor base {config.segmentor.base_channels} depth "
        f"{config.segmentor.depth}; T={config.diffusion.num_steps}",
        f"{'part':<28}{'params 1-bit':>14}{'params real':>14}{'MACs binary':>14}{'MACs real':>14}",
    ]
    sp, rp = count_parameters(seg), count_parameters(ref)
    rows = [
        ("segmentor (once per image)", sp, count_macs(seg, config)),
        ("refiner precompute (/image)", None, count_macs(ref, config, part="precompute")),
        ("refiner step (cached)", rp, count_macs(ref, config, part="step")),
    ]
    for name, pc, mc in rows:
        b = _m(pc.binary) if pc else " " * 11
        r = _m(pc.real) if pc else " " * 11
        lines.append(f"{name:<28}{b:>14}{r:>14}{_g(mc.binary):>14}{_g(mc.real):>14}")
    step = rows[2][2]
    lines.append(
        f"refiner: {_m(rp.total).strip()} params ({rp.binary / max(rp.total, 1):.0%} 1-bit), "
        f"{rp.storage_bytes / 2**20:.2f} MiB stored; per step {_g(step.total).strip()} MACs "
        f"({step.binary / max(step.total, 1):.0%} binary); "
        f"equivalent real MACs (binary/64 + real) {_g(step.binary / 64 + step.real).strip()}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hidiff.describe", description=__doc__)
    parser.add_argument(
        "presets", nargs="*", default=list(list_presets()), help="preset names (default: all)"
    )
    parser.add_argument("--num-classes", type=int, default=1)
    args = parser.parse_args(argv)
    for i, name in enumerate(args.presets):
        if i:
            print()
        print(describe(preset(name, num_classes=args.num_classes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
