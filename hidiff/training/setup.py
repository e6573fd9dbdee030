"""Everything a run needs before its first step: checked arguments, data, split, output folder.

Nothing is written here; :mod:`hidiff.training.loop` creates the folder only after all of this
succeeded (on every rank).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hidiff.checkpoint import load_checkpoint
from hidiff.config import OFFSETS, ModelConfig, preset
from hidiff.data.info import DatasetInfo
from hidiff.data.readers import get_reader
from hidiff.data.splits import Split, default_split
from hidiff.data.torch_dataset import SegmentationDataset
from hidiff.model_dir import (
    CHECKPOINT,
    CURVE_PNG,
    HEADER_FILES,
    SPLIT_JSON,
    TRAIN_LOG,
    ModelDirError,
    read_config,
    read_dataset_info,
    read_model_header,
    read_split,
)
from hidiff.training.lr_schedule import SEGMENTOR_SCHEDULES

__all__ = ["DEFAULT_BATCH_SIZE", "RunSpec", "TrainArgs", "model_dataset_info", "prepare_run"]

DEFAULT_BATCH_SIZE = {"paper": 32, "cpu-base": 8, "cpu-small": 8, "tiny": 8}
FALLBACK_BATCH_SIZE = 8
# Arguments that define the trajectory: on resume the stored values are used.
TRAJECTORY = ("batch_size", "lr", "weight_decay", "grad_clip", "seed", "pretrain_steps",
              "train_fp_twin", "lambda_diff", "limit_cases", "self_align", "pretrain_minutes",
              "refiner_holdout", "lambda_y0", "y0_term", "segmentor_schedule")

#: what folders written before an argument was recorded trained with (their resume keeps it)
UNRECORDED = {"lambda_y0": 0.0, "refiner_holdout": 0.0, "y0_term": "both",
              "segmentor_schedule": "constant"}
#: where the y0 cross-entropy acts: the diffusion loss of both phases, or the refiner's only
Y0_TERMS = ("both", "refiner")


@dataclass(frozen=True)
class TrainArgs:
    """The arguments of :func:`hidiff.training.train` (see its docstring)."""

    dataset: str
    data: str
    preset: str
    out: str
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int | None = None
    lr: float = 1e-4
    seed: int = 0
    pretrain_steps: int = 0
    pretrain_minutes: float = 0.0
    train_fp_twin: bool = False
    lambda_diff: float = 1.0
    resume: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    val_every: int | None = None
    num_workers: int = 0
    progress: bool = True
    limit_cases: int | None = None
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    device: str | None = None
    offset: str = "bayes"
    self_align: float = 0.5
    refiner_holdout: float = 0.0
    lambda_y0: float = 1.0
    y0_term: str = "both"
    segmentor_schedule: str = "cosine"
    refine_after_steps: int | None = None
    refine_after_minutes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_refine(self) -> None:
        steps, minutes = self.refine_after_steps, self.refine_after_minutes
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 0):
            raise ValueError(f"refine_after_steps must be an integer >= 0 (or None); "
                             f"got {steps!r}")
        if minutes is not None and (isinstance(minutes, bool)
                                    or not isinstance(minutes, int | float) or not minutes >= 0):
            raise ValueError(f"refine_after_minutes must be >= 0 (or None); got {minutes!r}")
        if self.resume:  # the pre-training options in force are the stored ones
            return
        if steps == 0 or minutes == 0:
            name = "refine_after_steps" if steps == 0 else "refine_after_minutes"
            raise ValueError(f"{name}=0 on a new run would never train its segmentor; give it "
                             "on --resume to go on with a trained one, or a later start")
        if steps is not None and steps < self.pretrain_steps:
            raise ValueError(f"refine_after_steps={steps} is before the end of pre-training "
                             f"(pretrain_steps={self.pretrain_steps}); the phases run in the "
                             "order pre-training, alternating, refiner alone")
        if minutes is not None and minutes < self.pretrain_minutes:
            raise ValueError(f"refine_after_minutes={minutes} is before the end of pre-training "
                             f"(pretrain_minutes={self.pretrain_minutes}); the phases run in "
                             "the order pre-training, alternating, refiner alone")

    def check(self) -> None:
        """``ValueError`` for values out of range (names and the allowed range)."""
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("give max_steps or max_minutes (or both): training needs a stop")
        for name in ("max_steps", "batch_size", "log_every", "checkpoint_every", "val_every",
                     "limit_cases"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None); got {value!r}")
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) is None:
                raise ValueError(f"{name} must be an integer >= 1; got None")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0; got {self.max_minutes!r}")
        for name in ("pretrain_steps", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        for name in ("lambda_diff", "weight_decay", "lambda_y0"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None; got {self.grad_clip!r}")
        if self.offset not in OFFSETS:
            raise ValueError(f"offset must be one of {', '.join(OFFSETS)}; got {self.offset!r}")
        if self.y0_term not in Y0_TERMS:
            raise ValueError(f"y0_term must be one of {', '.join(Y0_TERMS)}; "
                             f"got {self.y0_term!r}")
        if self.segmentor_schedule not in SEGMENTOR_SCHEDULES:
            raise ValueError(f"segmentor_schedule must be one of "
                             f"{', '.join(SEGMENTOR_SCHEDULES)}; got {self.segmentor_schedule!r}")
        pm = self.pretrain_minutes
        if isinstance(pm, bool) or not isinstance(pm, int | float) or not pm >= 0:
            raise ValueError(f"pretrain_minutes must be >= 0; got {pm!r}")
        if isinstance(self.self_align, bool) or not 0.0 <= self.self_align <= 1.0:
            raise ValueError(f"self_align must be in [0, 1]; got {self.self_align!r}")
        self._check_refine()
        rh = self.refiner_holdout
        if isinstance(rh, bool) or not isinstance(rh, int | float) or not 0.0 <= rh < 1.0:
            raise ValueError(f"refiner_holdout must be in [0, 1); got {rh!r}")


@dataclass
class RunSpec:
    """The resolved run: arguments in force, model, data and where to resume from."""

    args: TrainArgs
    out: Path
    config: ModelConfig
    info: DatasetInfo
    split: Split
    train_set: SegmentationDataset
    val_set: SegmentationDataset | None
    checkpoint: dict[str, Any] | None  # the checkpoint to resume from
    #: the refiner phase's cases when ``refiner_holdout`` > 0 (never seen by the segmentor)
    refiner_set: SegmentationDataset | None = None


def model_dataset_info(info: DatasetInfo, image_size: int) -> DatasetInfo:
    """The dataset's preprocessing at the model's input size (resize target and tile size)."""
    return info.replace(size=image_size, tile=image_size,
                        overlap=min(info.overlap, image_size // 4))


#: what a fresh run writes before its first checkpoint (a run killed then can start again)
_BEFORE_FIRST_CHECKPOINT = (*HEADER_FILES, TRAIN_LOG, CURVE_PNG)


def _check_out(out: Path, resume: bool) -> bool:
    """Check the output folder; True when ``resume`` must start from step 0 instead (the
    folder holds a run that was stopped before its first checkpoint, and nothing else)."""
    if out.exists() and not out.is_dir():
        raise ModelDirError(out, "exists and is a file; --out must be a folder (new or empty)")
    if resume:
        if not out.is_dir():
            raise ModelDirError(out, "does not exist: nothing to resume (train without --resume "
                                     "to start a new model there)")
        if (out / CHECKPOINT).is_file():
            read_model_header(out)
            return False
        others = [p.name for p in out.iterdir() if p.name not in _BEFORE_FIRST_CHECKPOINT
                  and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
        if others:
            raise ModelDirError(out / CHECKPOINT, f"is missing and the folder holds other files "
                                                  f"({', '.join(sorted(others)[:5])}): nothing "
                                                  f"to resume; choose a new folder")
        warnings.warn(f"{out} has no checkpoint (its run stopped before the first one): "
                      f"--resume starts it again from step 0", stacklevel=3)
        return True
    if out.is_dir() and any(out.iterdir()):
        raise ModelDirError(out, "already exists and is not empty: pass --resume to continue "
                                 "the model in it (or to restart a run stopped before its first "
                                 "checkpoint), or choose a new folder")
    return False


#: options of the phase schedule that a resume may change (a given value replaces the stored one
#: from the resumed step on; None keeps the stored one): a finished run can go on with its
#: segmentor frozen, as ``max_steps`` can be raised
SCHEDULE = ("refine_after_steps", "refine_after_minutes")


def _warn_ignored(out: Path, name: str, given: Any, stored: Any, where: str = "") -> None:
    """Warn that resuming ``out`` keeps its stored ``name`` over the ``given`` one."""
    # train() cannot tell a value equal to its default from one not given
    message = (f"{name}={given!r} is not used (given, or today's default); the run continues "
               f"with its stored {name}={stored!r}{where}" if given == _DEFAULTS.get(name) else
               f"{name}={given!r} ignored, the run continues with its stored "
               f"{name}={stored!r}{where}")
    warnings.warn(f"resuming {out}: {message}", stacklevel=4)


def _resolve_resumed(args: TrainArgs, stored: dict[str, Any], out: Path,
                     stored_step: int | None = None) -> TrainArgs:
    for name in ("dataset", "preset"):
        if str(stored.get(name)) != str(getattr(args, name)):
            raise ValueError(f"{out} was trained with {name}={stored.get(name)!r}, not "
                             f"{getattr(args, name)!r}; pass the same {name} to resume")
    changes = {}
    for name in TRAJECTORY:
        if name not in stored and name in UNRECORDED:
            stored = {**stored, name: UNRECORDED[name]}
        if name not in stored:
            continue
        given = getattr(args, name)
        if given != stored[name] and not (name == "batch_size" and given is None):
            _warn_ignored(out, name, given, stored[name])
        changes[name] = stored[name]
    for name in SCHEDULE:
        given = getattr(args, name)
        if given is None and stored.get(name) is not None:
            changes[name] = stored[name]
        elif given is not None and stored.get(name) != given:
            warnings.warn(f"resuming {out}: {name}={given!r} replaces the stored "
                          f"{name}={stored.get(name)!r} from step {stored_step} on",
                          stacklevel=3)
    return dataclasses.replace(args, **changes)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainArgs)
             if f.default is not dataclasses.MISSING}

#: the subset of a model folder's split.json that holds the refiner-only cases (refiner_holdout)
REFINER_SUBSET = "train_refiner"


def _hold_out(split: Split, train_cases: list, fraction: float) -> tuple[Split, list, list]:
    """``(split, segmentor cases, refiner cases)``: the last ``round(fraction * n)`` of the n
    train cases (the committed split's order, itself a seeded permutation) go to the refiner
    alone, listed as the split's ``train_refiner`` subset; ``train`` keeps the segmentor's."""
    if not fraction:
        return split, train_cases, []
    n_ref = round(fraction * len(train_cases))
    if not 1 <= n_ref < len(train_cases):
        raise ValueError(f"refiner_holdout={fraction} of {len(train_cases)} training case(s) "
                         f"leaves {n_ref} for the refiner and {len(train_cases) - n_ref} for the "
                         "segmentor; both need at least one")
    seg, ref = train_cases[:-n_ref], train_cases[-n_ref:]
    subsets = {**split.subsets, "train": [c.case_id for c in seg],
               REFINER_SUBSET: [c.case_id for c in ref]}
    rule = (f"{split.rule}; its last {n_ref} train ids held out from the segmentor for the "
            f"refiner ({REFINER_SUBSET})")
    return dataclasses.replace(split, rule=rule, subsets=subsets), seg, ref


def _limit_split(split: Split, train_ids: list[str], limit: int | None) -> Split:
    if limit is None:
        return split
    subsets = {**split.subsets, "train": list(train_ids)}
    rule = f"{split.rule}; training limited to its first {len(train_ids)} train ids"
    return dataclasses.replace(split, rule=rule, subsets=subsets)


def prepare_run(args: TrainArgs) -> RunSpec:
    """Check everything and load the data; raises ``ValueError``/``DataError`` early.

    Order: preset and dataset names, the output folder, then the data on disk.
    """
    args.check()
    reader = get_reader(args.dataset)  # ValueError listing the datasets
    args = dataclasses.replace(args, dataset=reader.name)
    preset(args.preset)  # ValueError listing the presets
    out = Path(args.out)
    if _check_out(out, args.resume):
        args = dataclasses.replace(args, resume=False)  # start again in the same folder
        args.check()  # as a new run (refine_after_* against pre-training)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(out / CHECKPOINT)
        args = _resolve_resumed(args, dict(checkpoint.get("train_args") or {}), out,
                                checkpoint.get("step"))
        config, info, split = read_config(out), read_dataset_info(out), read_split(out)
        if args.offset != config.refiner.offset:  # part of the model, not of the trajectory
            _warn_ignored(out, "offset", args.offset, config.refiner.offset, " (config.json)")
            args = dataclasses.replace(args, offset=config.refiner.offset)
        _, cases = reader.open(args.data)
        train_cases = split.select(cases, "train")
        refiner_cases = []
        if args.refiner_holdout:
            if REFINER_SUBSET not in split.names:
                raise ModelDirError(out / SPLIT_JSON, f"has no {REFINER_SUBSET!r} subset, which "
                                                      "refiner_holdout needs")
            refiner_cases = split.select(cases, REFINER_SUBSET)
    else:
        raw_info, cases = reader.open(args.data)  # DataError naming the folder
        config = preset(args.preset, num_classes=raw_info.num_classes,
                        in_channels=raw_info.channels)
        config = config.replace(refiner=dataclasses.replace(config.refiner, offset=args.offset))
        info = model_dataset_info(raw_info, config.image_size)
        split = default_split(reader.name, cases)
        train_cases = split.select(cases, "train")[: args.limit_cases]
        split = _limit_split(split, [c.case_id for c in train_cases], args.limit_cases)
        split, train_cases, refiner_cases = _hold_out(split, train_cases, args.refiner_holdout)
        if args.batch_size is None:
            size = DEFAULT_BATCH_SIZE.get(args.preset, FALLBACK_BATCH_SIZE)
            args = dataclasses.replace(args, batch_size=size)
    if args.batch_size is None:
        args = dataclasses.replace(args, batch_size=FALLBACK_BATCH_SIZE)
    if not train_cases:
        raise ValueError(f"the {reader.name} split has no training cases")
    size = config.image_size
    train_set = SegmentationDataset(train_cases, info, train=True, size=size, crop=size,
                                    seed=args.seed, cache=True)
    val_set = None
    if args.val_every is not None:
        val_cases = split.select(cases, "val")[: args.limit_cases] if "val" in split.names else []
        if not val_cases:
            raise ValueError(f"val_every is set but the {reader.name} split has no val cases")
        val_set = SegmentationDataset(val_cases, info, train=False, size=size, crop=size,
                                      seed=args.seed, cache=True)
    refiner_set = None
    if refiner_cases:
        refiner_set = SegmentationDataset(refiner_cases, info, train=True, size=size, crop=size,
                                          seed=args.seed, cache=True)
    return RunSpec(args, out, config, info, split, train_set, val_set, checkpoint, refiner_set)
