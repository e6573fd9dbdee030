"""Dataset records: one ``Case`` per image/mask pair, one ``DatasetInfo`` per dataset.

``DatasetInfo`` serialises to a ``dataset.json``-like dict (the nnU-Net habit): the nnU-Net keys
``name``, ``channel_names`` and ``labels`` plus hidiff's own ``num_classes``, ``modality``,
``preprocessing``, ``normalization`` and ``mask_encoding``. A bare nnU-Net ``dataset.json`` is
accepted by :meth:`DatasetInfo.from_dict` (missing hidiff keys take their defaults).

Class count rule: K = 1 for a binary task (exactly background + one foreground label, masks
``(1, H, W)``); K = number of labels, background included, when there are more than two labels
(one-hot masks ``(K, H, W)``, channel k is label value k).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reference
from hidiff.data.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POLICIES = reference.POLICIES  # how a whole image reaches the network (reference.whole_image)
MASK_ENCODINGS = ("threshold", "labels")


@dataclass(frozen=True)
class Case:
    """One image with its ground truth.

    ``mask`` is the primary ground truth (first observer where there are two). ``extras`` holds
    further files of the case by role, e.g. ``{"2ndHO": ...}`` (CHASE_DB1 second observer),
    ``{"fov": ..., "manual2": ...}`` (DRIVE field-of-view mask, second observer). ``subset`` is
    the official subset the file came from where a layout has one (DRIVE ``training``/``test``).
    """

    case_id: str
    image: Path
    mask: Path
    extras: Mapping[str, Path] = field(default_factory=dict)
    subset: str | None = None


def num_classes_for(labels: Mapping[str, int]) -> int:
    """K for a label dict: 1 for background + one foreground label, else the number of labels."""
    n = len(labels)
    if n < 2:
        raise ValueError(f"labels need background and at least one foreground label; got {labels}")
    return 1 if n == 2 else n


def normalise_labels(labels: Mapping[str, Any]) -> dict[str, int]:
    """Validate a ``labels`` dict; accept the nnU-Net v1 form ``{"0": "background", ...}`` too.

    Values must be the consecutive integers 0..n-1 with 0 named background (any name).
    """
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"labels must be a non-empty dict name -> value; got {labels!r}")
    items = list(labels.items())
    if all(isinstance(v, str) for _, v in items) and all(str(k).isdigit() for k, _ in items):
        items = [(v, int(k)) for k, v in items]  # nnU-Net v1: value -> name
    out: dict[str, int] = {}
    for name, value in items:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"label {name!r} has value {value!r}; only integer labels are supported "
                "(nnU-Net region labels, lists of values, are not)"
            )
        out[str(name)] = value
    values = sorted(out.values())
    if values != list(range(len(values))):
        raise ValueError(f"label values must be the consecutive integers 0..{len(values) - 1}; "
                         f"got {values}")
    num_classes_for(out)
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and how hidiff preprocesses it.

    ``policy`` ``"resize"``: every image is resized to ``size`` x ``size`` (polyp datasets).
    ``policy`` ``"tile"``: images stay at native resolution; training uses random ``tile`` x
    ``tile`` crops and prediction covers the whole image with tiles overlapping by ``overlap``
    pixels (vessel datasets). ``mean``/``std`` normalise the [0, 1] image per channel.
    ``mask_encoding`` ``"threshold"``: a binary mask stored with grey levels (lossy JPEG: value >
    half range; lossless two-level: value > 0); ``"labels"``: pixel values are label values and
    anything else is an error (binary masks may also be stored as 0/255).
    """

    name: str
    labels: Mapping[str, int] = field(default_factory=lambda: {"background": 0, "foreground": 1})
    channel_names: tuple[str, ...] = ("R", "G", "B")
    modality: str = ""
    policy: str = "resize"
    size: int = 256
    tile: int = 256
    overlap: int = 64
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    mask_encoding: str = "threshold"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", normalise_labels(self.labels))
        object.__setattr__(self, "channel_names", tuple(str(c) for c in self.channel_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.channel_names:
            raise ValueError("channel_names must name at least one channel")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values (one per channel); got "
                             f"{len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0; got {self.std}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} not allowed; allowed: {', '.join(POLICIES)}")
        if self.mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"mask_encoding {self.mask_encoding!r} not allowed; allowed: "
                             f"{', '.join(MASK_ENCODINGS)}")
        for key in ("size", "tile", "overlap"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"preprocessing {key} must be an integer; got {value!r}")
        if self.size < 1 or self.tile < 1:
            raise ValueError(f"size and tile must be >= 1; got size={self.size}, tile={self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile={self.tile}); got {self.overlap}")

    @property
    def channels(self) -> int:
        """Image channel count (3 for RGB)."""
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """K: 1 for binary, else the number of labels (background included)."""
        return num_classes_for(self.labels)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(sorted(self.labels.values()))

    def replace(self, **changes: Any) -> DatasetInfo:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready ``dataset.json``-like dict; :meth:`from_dict` inverts it."""
        return {
            "name": self.name,
            "channel_names": {str(i): c for i, c in enumerate(self.channel_names)},
            "channels": self.channels,
            "labels": dict(self.labels),
            "num_classes": self.num_classes,
            "modality": self.modality,
            "preprocessing": {
                "policy": self.policy, "size": self.size, "tile": self.tile,
                "overlap": self.overlap,
            },
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "mask_encoding": self.mask_encoding,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str | None = None,
                  defaults: DatasetInfo | None = None) -> DatasetInfo:
        """Build from a dict written by :meth:`to_dict` or from a plain nnU-Net ``dataset.json``.

        Keys absent from ``data`` come from ``defaults`` (or the class defaults); ``name`` is used
        when ``data`` has none. Raises ``ValueError`` naming the offending key.
        """
        if not isinstance(data, Mapping):
            kind = type(data).__name__
            raise ValueError(f"dataset description must be a JSON object; got {kind}")
        kwargs: dict[str, Any] = {}
        if defaults is not None:
            kwargs = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}
        data_name = data.get("name", name)
        if data_name is None and "name" not in kwargs:
            raise ValueError("dataset description has no 'name'")
        if data_name is not None:
            kwargs["name"] = str(data_name)
        if "labels" in data:
            kwargs["labels"] = data["labels"]
        channels = data.get("channel_names", data.get("modality"))  # v2 / v1 key
        if isinstance(channels, Mapping):
            kwargs["channel_names"] = tuple(
                str(channels[k]) for k in sorted(channels, key=lambda k: int(k))
            )
        elif isinstance(data.get("channels"), int):
            n = data["channels"]
            names = ("R", "G", "B") if n == 3 else tuple(f"c{i}" for i in range(n))
            kwargs["channel_names"] = names
        if "channel_names" in kwargs:
            n = len(kwargs["channel_names"])
            if len(kwargs.get("mean", IMAGENET_MEAN)) != n:
                kwargs["mean"], kwargs["std"] = (0.5,) * n, (0.5,) * n
        if isinstance(data.get("modality"), str):
            kwargs["modality"] = data["modality"]
        pre = data.get("preprocessing", {})
        for key in ("policy", "size", "tile", "overlap"):
            if key in pre:
                kwargs[key] = pre[key]
        norm = data.get("normalization", {})
        for key in ("mean", "std"):
            if key in norm:
                kwargs[key] = tuple(norm[key])
        if "mask_encoding" in data:
            kwargs["mask_encoding"] = data["mask_encoding"]
        info = cls(**kwargs)
        if "channels" in data and data["channels"] != info.channels:
            raise ValueError(f"channels {data['channels']} contradicts channel_names "
                             f"{list(info.channel_names)}")
        if "num_classes" in data and int(data["num_classes"]) != info.num_classes:
            raise ValueError(f"num_classes {data['num_classes']} contradicts labels "
                             f"{dict(info.labels)} (K = {info.num_classes})")
        return info

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, defaults: DatasetInfo | None = None) -> DatasetInfo:
        """Read a ``dataset.json``; problems become ``DataError`` naming the file.

        Keys the file lacks come from ``defaults``; the name defaults to the folder's name."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise DataError(path, "dataset description file not found") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(path, f"cannot read dataset description: {err}") from err
        try:
            return cls.from_dict(data, name=path.parent.name, defaults=defaults)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(path, f"invalid dataset description: {err}") from err
