"""Model configuration: segmentor, refiner and diffusion settings, presets, JSON round trip.

Every config is a frozen dataclass validated on construction (``ValueError`` naming the allowed
values). Sequences are stored as tuples. ``ModelConfig.to_dict`` / ``from_dict`` and
``to_json`` / ``from_json`` round-trip exactly; unknown keys raise ``ValueError`` naming them.

Presets (``preset(name, num_classes=...)``, ``list_presets()``):

``paper``      256 x 256, refiner base 128 (the paper's width), T = 10.
``cpu-base``   256 x 256, refiner base 32: trainable on a CPU box, slowly.
``cpu-small``  128 x 128, refiner base 16: a few hundred training steps on 2 cores are practical.
``tiny``       64 x 64, base 8: unit tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import reference

__all__ = [
    "ATTENTIONS",
    "ESTIMATES",
    "OFFSETS",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SCHEDULES",
    "UP_MODES",
    "DiffusionConfig",
    "ModelConfig",
    "RefinerConfig",
    "SegmentorConfig",
    "list_presets",
    "preset",
]

SCHEDULES: tuple[str, ...] = reference.SCHEDULE_NAMES
SAMPLERS: tuple[str, ...] = reference.SAMPLERS
PARAMETERIZATIONS: tuple[str, ...] = reference.PARAMETERIZATIONS
OFFSETS: tuple[str, ...] = reference.OFFSETS
ESTIMATES: tuple[str, ...] = reference.ESTIMATES
#: new models: the mean of each chain's steps (docs/architecture.md, "Inference")
DEFAULT_SAMPLING_ESTIMATE = "trajectory"
ATTENTIONS: tuple[str, ...] = ("hard", "softmax")
UP_MODES: tuple[str, ...] = ("bilinear", "transpose")
PAD_VALUES: tuple[float, ...] = reference.ALLOWED_PAD_VALUES


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def _is_power_of_two(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class SegmentorConfig:
    """A plain real-valued U-Net segmentor (``hidiff.segmentor.UNetSegmentor``).

    ``depth`` is the number of 2x downsamplings (levels at strides 1, 2, ..., 2**depth); level i
    has ``min(base_channels * 2**i, max_channels)`` channels. ``feature_strides`` chooses the
    decoder features handed to the refiner (``None``: every stride, bottleneck included).
    """

    in_channels: int = 3
    num_classes: int = 1
    base_channels: int = 32
    depth: int = 5
    max_channels: int = 512
    up_mode: str = "bilinear"
    feature_strides: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "base_channels", "depth", "max_channels"):
            _positive_int(f"SegmentorConfig.{name}", getattr(self, name))
        if self.max_channels < self.base_channels:
            raise ValueError(
                f"SegmentorConfig.max_channels ({self.max_channels}) must be >= base_channels "
                f"({self.base_channels})"
            )
        _choice("SegmentorConfig.up_mode", self.up_mode, UP_MODES)
        if self.feature_strides is not None:
            fs = tuple(self.feature_strides)
            object.__setattr__(self, "feature_strides", fs)
            allowed = tuple(2**i for i in range(self.depth + 1))
            bad = [s for s in fs if s not in allowed]
            if not fs or bad or list(fs) != sorted(set(fs)):
                raise ValueError(
                    "SegmentorConfig.feature_strides must be a non-empty, strictly increasing "
                    f"subset of {allowed}; got {fs!r}"
                )

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides of the features the segmentor returns, finest first."""
        if self.feature_strides is not None:
            return tuple(self.feature_strides)
        return tuple(2**i for i in range(self.depth + 1))

    def level_channels(self) -> tuple[int, ...]:
        """Channels of level i (stride 2**i), i = 0..depth."""
        return tuple(
            min(self.base_channels * 2**i, self.max_channels) for i in range(self.depth + 1)
        )


@dataclass(frozen=True)
class RefinerConfig:
    """The binarized refiner (BBDM, ``hidiff.refiner.BinaryRefiner``), method §8.

    Level i runs at stride 2**i with ``base_channels * channel_mults[i]`` channels; the last level
    is the bottleneck (stride 32 with the default six multipliers). ``blocks_per_level`` binary
    basic blocks per encoder level (the decoder uses as many, the first being the up block's).
    ``emb_dim`` is the width of the step embedding (``emb_freq_dim`` its sinusoidal part).
    ``use_image``: the stem sees concat[x, y_t, p] (default) or concat[y_t, p].
    ``attention``: ``"hard"`` (binarized 0/1 map 1[prob > attention_threshold * row max], softmax
    straight-through gradient) or ``"softmax"``. ``binary=False`` builds the full-precision twin.
    ``offset``: ``"bayes"`` (default) adds the logit of the analytic estimate E[target | y_t, p]
    to the network's logits, so an untrained refiner reproduces the segmentor
    (:mod:`reference.estimate`); ``"none"`` is the plain form (a config written before this
    option existed loads as ``"none"``).
    """

    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    blocks_per_level: int = 2
    emb_dim: int = 512
    emb_freq_dim: int = 128
    use_image: bool = True
    parameterization: str = "eps"
    offset: str = "bayes"
    binary: bool = True
    pad_value: float = 1.0
    use_xformer: bool = True
    xformer_heads: int = 8
    xformer_mlp_ratio: int = 2
    attention: str = "hard"
    attention_threshold: float = 0.35

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        for name in (
            "base_channels",
            "blocks_per_level",
            "emb_dim",
            "emb_freq_dim",
            "xformer_heads",
            "xformer_mlp_ratio",
        ):
            _positive_int(f"RefinerConfig.{name}", getattr(self, name))
        if not self.channel_mults:
            raise ValueError("RefinerConfig.channel_mults must have at least one level")
        for m in self.channel_mults:
            _positive_int("RefinerConfig.channel_mults[i]", m)
        if self.emb_freq_dim % 2:
            raise ValueError(f"RefinerConfig.emb_freq_dim must be even; got {self.emb_freq_dim}")
        _choice("RefinerConfig.parameterization", self.parameterization, PARAMETERIZATIONS)
        _choice("RefinerConfig.offset", self.offset, OFFSETS)
        _choice("RefinerConfig.attention", self.attention, ATTENTIONS)
        _choice("RefinerConfig.pad_value", self.pad_value, PAD_VALUES)
        object.__setattr__(self, "pad_value", float(self.pad_value))
        for name in ("use_image", "binary", "use_xformer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RefinerConfig.{name} must be True or False")
        thr = self.attention_threshold
        if isinstance(thr, bool) or not isinstance(thr, int | float) or not 0.0 < thr < 1.0:
            raise ValueError(f"RefinerConfig.attention_threshold must be in (0, 1); got {thr!r}")
        if self.bottleneck_channels % self.xformer_heads:
            raise ValueError(
                f"RefinerConfig.xformer_heads ({self.xformer_heads}) must divide the bottleneck "
                f"channels ({self.bottleneck_channels})"
            )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2**i for i in range(self.num_levels))

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def bottleneck_channels(self) -> int:
        return self.base_channels * self.channel_mults[-1]


@dataclass(frozen=True)
class DiffusionConfig:
    """Bernoulli diffusion settings (method §2-§6).

    ``sampling_steps`` None means all ``num_steps`` (see :attr:`num_sampling_steps`);
    ``sampling_samples`` is S, the number of reverse chains averaged per image by default;
    ``sampling_estimate`` how a chain's estimate is formed from its steps' y0 estimates
    (``reference.ESTIMATES``: ``last`` or ``trajectory``, their mean; the same for one step).
    Configs written before it existed read as ``last``, what they were evaluated with.
    """

    schedule: str = "cosine"
    num_steps: int = 10
    sampling_steps: int | None = None
    sampler: str = "ddim"
    sampling_samples: int = 1
    sampling_estimate: str = DEFAULT_SAMPLING_ESTIMATE
    lambda_focal: float = 1.0
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        _choice("DiffusionConfig.schedule", self.schedule, SCHEDULES)
        _choice("DiffusionConfig.sampler", self.sampler, SAMPLERS)
        _positive_int("DiffusionConfig.num_steps", self.num_steps)
        _positive_int("DiffusionConfig.sampling_samples", self.sampling_samples)
        _choice("DiffusionConfig.sampling_estimate", self.sampling_estimate, ESTIMATES)
        if self.sampling_steps is not None:
            _positive_int("DiffusionConfig.sampling_steps", self.sampling_steps)
            if self.sampling_steps > self.num_steps:
                raise ValueError(
                    f"DiffusionConfig.sampling_steps ({self.sampling_steps}) must be in "
                    f"1..num_steps ({self.num_steps})"
                )
        for name in ("lambda_focal", "focal_gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ValueError(f"DiffusionConfig.{name} must be a number >= 0; got {v!r}")
            object.__setattr__(self, name, float(v))

    @property
    def num_sampling_steps(self) -> int:
        return self.num_steps if self.sampling_steps is None else self.sampling_steps


_SECTIONS: dict[str, type] = {
    "segmentor": SegmentorConfig,
    "refiner": RefinerConfig,
    "diffusion": DiffusionConfig,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a HiDiff model. ``in_channels`` / ``num_classes`` must agree
    with the segmentor's; ``image_size`` must be divisible by the deepest stride of both nets."""

    image_size: int = 256
    in_channels: int = 3
    num_classes: int = 1
    segmentor: SegmentorConfig = field(default_factory=SegmentorConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preset: str = "custom"

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "num_classes"):
            _positive_int(f"ModelConfig.{name}", getattr(self, name))
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"ModelConfig.{name} must be a {cls.__name__}")
        if not isinstance(self.preset, str):
            raise ValueError(f"ModelConfig.preset must be a string; got {self.preset!r}")
        seg = self.segmentor
        if (seg.in_channels, seg.num_classes) != (self.in_channels, self.num_classes):
            raise ValueError(
                f"segmentor in_channels/num_classes ({seg.in_channels}, {seg.num_classes}) must "
                f"equal the model's ({self.in_channels}, {self.num_classes})"
            )
        deepest = max(2**seg.depth, self.refiner.strides[-1])
        if self.image_size % deepest:
            raise ValueError(
                f"ModelConfig.image_size ({self.image_size}) must be divisible by {deepest}, the "
                "deepest stride of the segmentor / refiner"
            )

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise. Keys added
        after folders were written take what those folders meant instead: a ``refiner`` dict
        without ``offset`` is ``none``, a ``diffusion`` dict without ``sampling_estimate`` is
        ``last`` (an absent section is a default section)."""
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig.from_dict needs a dict; got {type(data).__name__}")
        _check_keys(cls, data, "ModelConfig")
        kwargs = dict(data)
        for name, section in _SECTIONS.items():
            if name in kwargs:
                kwargs[name] = _section_from_dict(section, kwargs[name], name)
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; ``num_classes``/``in_channels`` also update the segmentor."""
        seg_changes = {k: changes[k] for k in ("num_classes", "in_channels") if k in changes}
        if seg_changes and "segmentor" not in changes:
            changes["segmentor"] = dataclasses.replace(self.segmentor, **seg_changes)
        return dataclasses.replace(self, **changes)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )


def _section_from_dict(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"ModelConfig.{where} must be a dict; got {type(data).__name__}")
    _check_keys(cls, data, where)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    if cls is RefinerConfig:
        kwargs.setdefault("offset", "none")  # written before the offset existed: the plain form
    if cls is DiffusionConfig:  # written before the choice existed: each chain's last estimate
        kwargs.setdefault("sampling_estimate", "last")
    return cls(**kwargs)


# -- presets ----------------------------------------------------------------------------------

# name -> (image_size, segmentor kwargs, refiner kwargs); every preset uses T = 10, cosine.
_PRESETS: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "paper": (256, dict(base_channels=32, depth=5, max_channels=512),
              dict(base_channels=128, channel_mults=(1, 1, 2, 2, 4, 4), blocks_per_level=2,
                   emb_dim=512, emb_freq_dim=128, xformer_heads=8)),
    "cpu-base": (256, dict(base_channels=16, depth=5, max_channels=256),
                 dict(base_channels=32, channel_mults=(1, 1, 2, 2, 4, 4), blocks_per_level=2,
                      emb_dim=128, emb_freq_dim=64, xformer_heads=4)),
    "cpu-small": (128, dict(base_channels=16, depth=4, max_channels=128),
                  dict(base_channels=16, channel_mults=(1, 2, 2, 4, 4), blocks_per_level=1,
                       emb_dim=64, emb_freq_dim=32, xformer_heads=4)),
    "tiny": (64, dict(base_channels=8, depth=3, max_channels=32),
             dict(base_channels=8, channel_mults=(1, 2, 2, 4), blocks_per_level=1,
                  emb_dim=32, emb_freq_dim=16, xformer_heads=2)),
}  # fmt: skip


#: default sampling of the presets: 1 step (T), 4 chains averaged (val Dice per second of
#: inference on the Kvasir-SEG val split, benchmarks/results/ablation.md)
DEFAULT_SAMPLING_STEPS = 1
DEFAULT_SAMPLING_SAMPLES = 4


def list_presets() -> tuple[str, ...]:
    """The preset names, largest first."""
    return tuple(_PRESETS)


def preset(name: str, *, num_classes: int = 1, in_channels: int = 3) -> ModelConfig:
    """The named preset for a task with ``num_classes`` mask channels (1 = binary task)."""
    if not isinstance(name, str) or name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(map(repr, _PRESETS))}")
    image_size, seg, ref = _PRESETS[name]
    return ModelConfig(
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        segmentor=SegmentorConfig(in_channels=in_channels, num_classes=num_classes, **seg),
        refiner=RefinerConfig(**ref),
        # sampling defaults chosen on the Kvasir-SEG val split (benchmarks/results/ablation.md)
        diffusion=DiffusionConfig(num_steps=10, sampling_steps=DEFAULT_SAMPLING_STEPS,
                                  sampling_samples=DEFAULT_SAMPLING_SAMPLES),
        preset=name,
    )
