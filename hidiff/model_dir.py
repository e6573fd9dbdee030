"""The self-describing model folder (docs/architecture.md, "The model folder").

``hidiff train --out DIR`` writes, and ``evaluate``/``predict``/``export`` need only::

    DIR/hidiff_model.json   {"format": "hidiff-model", "format_version": 1, "created", "commit"}
    DIR/config.json         ModelConfig.to_dict()
    DIR/dataset.json        DatasetInfo.to_dict() (preprocessing at the model's image size)
    DIR/split.json          the split used (train ids as trained on)
    DIR/checkpoint.pt       networks, optimizers, RNG states, train_args (see hidiff/checkpoint.py)
    DIR/train_log.jsonl     one JSON object per logged step
    DIR/training_curve.png  losses against steps

Every file is written atomically: a temporary file in the same folder, then ``os.replace``, so a
killed process leaves either the old or the new file, never a torn one.
:func:`load_model_dir` rebuilds the networks from the folder alone, in eval mode.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hidiff.checkpoint import load_checkpoint
from hidiff.config import ModelConfig
from hidiff.data.info import DatasetInfo
from hidiff.data.splits import Split
from hidiff.model_files import (
    ModelDirError,
    atomic_write,
    atomic_write_text,
    remove_stale_temp_files,
    write_json,
)
from hidiff.refiner import BinaryRefiner
from hidiff.segmentor import UNetSegmentor

__all__ = [
    "CHECKPOINT", "CONFIG_JSON", "CURVE_PNG", "DATASET_JSON", "FORMAT", "FORMAT_VERSION",
    "MODEL_JSON", "SPLIT_JSON", "TRAIN_LOG", "LoadedModel", "ModelDirError", "atomic_write",
    "HEADER_FILES", "atomic_write_text", "build_networks", "git_commit", "load_model_dir",
    "read_config", "read_dataset_info", "read_json", "read_split",
    "read_model_header", "remove_stale_temp_files", "write_json", "write_model_files",
]

FORMAT = "hidiff-model"
FORMAT_VERSION = 1
MODEL_JSON = "hidiff_model.json"
CONFIG_JSON = "config.json"
DATASET_JSON = "dataset.json"
SPLIT_JSON = "split.json"
CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
CURVE_PNG = "training_curve.png"
HEADER_FILES = (MODEL_JSON, CONFIG_JSON, DATASET_JSON, SPLIT_JSON)


# -- reading --------------------------------------------------------------------------------------


def read_json(folder: str | Path, name: str) -> Any:
    """The JSON content of ``folder/name``; ``ModelDirError`` naming the file when missing/bad."""
    path = Path(folder) / name
    if not path.is_file():
        raise ModelDirError(path, "is missing: train first or pass the right folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirError(path, f"is corrupt (not valid JSON: {err})") from err


def read_model_header(folder: str | Path) -> dict[str, Any]:
    """``hidiff_model.json``, checked: right format, a format version this code reads."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a model folder" if folder.exists() else "does not exist"
        raise ModelDirError(folder, f"{what}: train first or pass the right folder")
    header = read_json(folder, MODEL_JSON)
    path = folder / MODEL_JSON
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelDirError(path, f"is not a hidiff model description (format must be {FORMAT!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirError(
            path, f"has format_version {version!r}; this hidiff reads version {FORMAT_VERSION} "
            "only (use the hidiff release that wrote it)"
        )
    return header


def _parse(folder: Path, name: str, parse: Callable[[Any], Any]) -> Any:
    data = read_json(folder, name)
    try:
        return parse(data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelDirError(folder / name, f"is corrupt or invalid: {err}") from err


def read_config(folder: str | Path) -> ModelConfig:
    return _parse(Path(folder), CONFIG_JSON, ModelConfig.from_dict)


def read_dataset_info(folder: str | Path) -> DatasetInfo:
    return _parse(Path(folder), DATASET_JSON, DatasetInfo.from_dict)


def read_split(folder: str | Path) -> Split:
    return _parse(Path(folder), SPLIT_JSON, Split.from_dict)


# -- writing --------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """The git commit of the hidiff source tree (``+dirty`` if modified), or None."""
    here = Path(__file__).resolve().parent
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True)
        commit = run.stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=here, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if status.stdout.strip() else "") if commit else None


def write_model_files(folder: str | Path, *, config: ModelConfig, dataset_info: DatasetInfo,
                      split: Split, extra: dict[str, Any] | None = None) -> None:
    """Write hidiff_model.json, config.json, dataset.json and split.json (atomically)."""
    folder = Path(folder)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        **(extra or {}),
    }
    write_json(folder / CONFIG_JSON, config.to_dict())
    write_json(folder / DATASET_JSON, dataset_info.to_dict())
    atomic_write_text(folder / SPLIT_JSON, split.to_json())
    write_json(folder / MODEL_JSON, header)  # last: its presence marks a complete header


# -- networks -------------------------------------------------------------------------------------


def build_networks(config: ModelConfig, *, fp_twin: bool
                   ) -> tuple[UNetSegmentor, BinaryRefiner, BinaryRefiner | None]:
    """Segmentor, binary refiner (``config.refiner.binary``) and, if asked, the FP twin."""
    seg = UNetSegmentor(config.segmentor)

    def refiner(binary: bool | None) -> BinaryRefiner:
        return BinaryRefiner(config.refiner, num_classes=config.num_classes,
                             image_channels=config.in_channels,
                             feature_channels=seg.feature_channels,
                             feature_strides=seg.feature_strides, binary=binary)

    return seg, refiner(None), refiner(False) if fp_twin else None


@dataclass
class LoadedModel:
    """A trained model folder, networks built and loaded, in eval mode.

    ``refiner_fp`` is the full-precision twin (None when trained without it); ``step`` the
    completed training iterations; ``header`` hidiff_model.json; ``train_args`` the arguments
    of the run (from the checkpoint).
    """

    config: ModelConfig
    dataset_info: DatasetInfo
    split: Split
    segmentor: UNetSegmentor
    refiner: BinaryRefiner
    refiner_fp: BinaryRefiner | None
    step: int
    path: Path
    header: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=dict)


def _load_state(module: nn.Module, state: Any, path: Path, key: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        raise ModelDirError(path, f"has a {key!r} state that does not match config.json: "
                                 f"{err}") from err


def load_model_dir(path: str | Path, *, map_location: str | torch.device = "cpu"
                   ) -> LoadedModel:
    """Rebuild the segmentor and refiner(s) of a model folder from its files alone (eval mode).

    Raises :class:`ModelDirError` (a ``ValueError``) naming the folder and the missing or corrupt
    file, or an unknown ``format_version``.
    """
    folder = Path(path)
    header = read_model_header(folder)
    config = read_config(folder)
    info = read_dataset_info(folder)
    split = read_split(folder)
    ckpt = load_checkpoint(folder / CHECKPOINT, map_location=map_location)
    ckpt_path = folder / CHECKPOINT
    seg, ref, ref_fp = build_networks(config, fp_twin=ckpt.get("refiner_fp") is not None)
    _load_state(seg, ckpt["segmentor"], ckpt_path, "segmentor")
    _load_state(ref, ckpt["refiner"], ckpt_path, "refiner")
    if ref_fp is not None:
        _load_state(ref_fp, ckpt["refiner_fp"], ckpt_path, "refiner_fp")
    for net in (seg, ref, ref_fp):
        if net is not None:
            net.to(map_location).eval()
    return LoadedModel(config, info, split, seg, ref, ref_fp, int(ckpt["step"]), folder,
                       header, dict(ckpt.get("train_args") or {}))
