"""Deterministic train/val/test splits and the committed split files ``hidiff/splits/*.json``.

:func:`make_split` is the one generator. Committed splits (regenerate with
``python -m hidiff.data.splits <dataset> <root>``; a test checks the files still match the data):

- ``kvasir-seg``: seed 42, fractions 0.8/0.1/0.1 of the sorted ids -> 800/100/100.
- ``chase-db1``: by subject, in order (no shuffle): subjects 01-09 train (18 images), subject 10
  val (2), subjects 11-14 test (8) -- the common "first 20 train, last 8 test" convention with
  the validation subject taken from the 20 training images. NNL and NNR stay together.

Defaults where nothing is committed (:func:`default_split`): ``drive`` keeps the official test
set and draws 10 % of the official training images (seed 42) for val; ``cvc-clinicdb`` and
``generic`` use seed 42 and 0.8/0.1/0.1 of the cases (CVC-ClinicDB frames come from 29 video
sequences that its layout does not name, so a frame-level split is optimistic).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hidiff.data.errors import DataError, preview
from hidiff.data.info import Case
from hidiff.data.readers import chase_subject, get_reader

SPLITS_DIR = Path(__file__).resolve().parents[1] / "splits"
DEFAULT_SEED = 42
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
GROUP_FUNCTIONS: dict[str, Callable[[str], str]] = {"subject": chase_subject}


def _group_counts(fractions: Mapping[str, float | int], n: int) -> list[int]:
    values = list(fractions.values())
    if not values:
        raise ValueError("fractions must name at least one subset")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if any(v < 0 for v in values) or sum(values) != n:
            raise ValueError(f"integer fractions are group counts and must be >= 0 and sum to the "
                             f"{n} groups; got {dict(fractions)}")
        return [int(v) for v in values]
    floats = [float(v) for v in values]
    if any(f < 0 for f in floats) or not math.isclose(sum(floats), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be >= 0 and sum to 1; got {dict(fractions)}")
    exact = [f * n for f in floats]
    counts = [math.floor(e + 1e-9) for e in exact]
    # Largest remainder; ties go to the subset named first.
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def make_split(case_ids: Iterable[str], *, seed: int | None,
               fractions: Mapping[str, float | int] = DEFAULT_FRACTIONS,
               group_fn: Callable[[str], str] | None = None) -> dict[str, list[str]]:
    """Split case ids into named subsets, deterministically.

    The ids are sorted (plain string order) and grouped by ``group_fn`` (default: each id is its
    own group); groups are ordered by their sorted key. ``seed`` not None: the groups are permuted
    with ``numpy.random.default_rng(seed).permutation``; ``seed`` None keeps the sorted order (for
    "first N / last M" conventions). ``fractions`` maps subset name -> fraction of the groups
    (floats summing to 1, rounded by largest remainder) or exact group counts (ints summing to the
    number of groups). Consecutive groups are dealt to the subsets in the order ``fractions``
    names them. Each subset's ids are returned sorted.
    """
    ids = sorted(str(i) for i in case_ids)
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate case ids: {preview(dupes)}")
    groups: dict[str, list[str]] = {}
    for case_id in ids:
        groups.setdefault(group_fn(case_id) if group_fn else case_id, []).append(case_id)
    keys = sorted(groups)
    if seed is not None:
        keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    counts = _group_counts(fractions, len(keys))
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in zip(fractions, counts, strict=True):
        out[name] = sorted(i for key in keys[start:start + count] for i in groups[key])
        start += count
    return out


@dataclass(frozen=True)
class Split:
    """A named split of one dataset: ``split["train"]`` is the list of case ids."""

    dataset: str
    rule: str
    seed: int | None
    fractions: Mapping[str, float | int]
    group_by: str | None
    subsets: Mapping[str, list[str]]

    def __getitem__(self, name: str) -> list[str]:
        if name not in self.subsets:
            raise KeyError(f"split of {self.dataset} has no subset {name!r}; it has "
                           f"{', '.join(self.subsets)}")
        return list(self.subsets[name])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.subsets)

    def select(self, cases: Sequence[Case], name: str) -> list[Case]:
        """The cases of subset ``name`` (in split order); ids absent from ``cases`` are an error."""
        by_id = {c.case_id: c for c in cases}
        missing = [i for i in self[name] if i not in by_id]
        if missing:
            raise DataError(None, f"{len(missing)} case(s) of the {self.dataset} {name!r} split "
                                  f"are not in the data: {preview(missing)}")
        return [by_id[i] for i in self[name]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "rule": self.rule,
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "group_by": self.group_by,
            "counts": {k: len(v) for k, v in self.subsets.items()},
            "subsets": {k: list(v) for k, v in self.subsets.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Split:
        if not isinstance(data, Mapping) or not isinstance(data.get("subsets"), Mapping):
            got = type(data).__name__ if not isinstance(data, Mapping) else "no 'subsets' object"
            raise ValueError(f"a split must be a JSON object with 'dataset' and a 'subsets' "
                             f"object of id lists; got {got}")
        subsets = {str(k): [str(i) for i in v] for k, v in data["subsets"].items()}
        seen: dict[str, str] = {}
        for name, ids in subsets.items():
            for case_id in ids:
                if case_id in seen:
                    raise ValueError(f"case {case_id!r} is in both {seen[case_id]!r} and {name!r}")
                seen[case_id] = name
        for name, count in data.get("counts", {}).items():
            if len(subsets.get(name, [])) != count:
                raise ValueError(f"counts says {name!r} has {count} cases but it lists "
                                 f"{len(subsets.get(name, []))}")
        return cls(dataset=str(data["dataset"]), rule=str(data.get("rule", "")),
                   seed=data.get("seed"), fractions=dict(data.get("fractions", {})),
                   group_by=data.get("group_by"), subsets=subsets)


@dataclass(frozen=True)
class SplitSpec:
    seed: int | None
    fractions: Mapping[str, float | int]
    group_by: str | None
    rule: str


COMMITTED: dict[str, SplitSpec] = {
    "kvasir-seg": SplitSpec(
        seed=DEFAULT_SEED, fractions={"train": 0.8, "val": 0.1, "test": 0.1}, group_by=None,
        rule="make_split: the 1000 image ids sorted, permuted with "
             "numpy.random.default_rng(42).permutation, then 80/10/10 % dealt in order to "
             "train/val/test (800/100/100)",
    ),
    "chase-db1": SplitSpec(
        seed=None, fractions={"train": 9, "val": 1, "test": 4}, group_by="subject",
        rule="by subject (Image_NNL and Image_NNR are the two eyes of child NN and stay "
             "together), in order, no shuffle: subjects 01-09 train (18 images), subject 10 val "
             "(2), subjects 11-14 test (8); the common convention first 20 images train / last 8 "
             "test, with the validation subject taken from the training 20",
    ),
}


def build_split(dataset: str, case_ids: Iterable[str]) -> Split:
    """The committed split of ``dataset`` regenerated from ``case_ids``."""
    if dataset not in COMMITTED:
        raise ValueError(f"no committed split rule for {dataset!r}; committed: "
                         f"{', '.join(sorted(COMMITTED))}")
    spec = COMMITTED[dataset]
    group_fn = GROUP_FUNCTIONS[spec.group_by] if spec.group_by else None
    subsets = make_split(case_ids, seed=spec.seed, fractions=spec.fractions, group_fn=group_fn)
    return Split(dataset, spec.rule, spec.seed, dict(spec.fractions), spec.group_by, subsets)


def committed_split_path(dataset: str) -> Path:
    return SPLITS_DIR / f"{dataset}.json"


def load_split(name_or_path: str | Path) -> Split:
    """A committed split by dataset name (``"kvasir-seg"``, ``"chase-db1"``) or a split file."""
    key = str(name_or_path)
    path = committed_split_path(key) if key in COMMITTED else Path(name_or_path)
    if not path.is_file():
        if key.endswith(".json") or isinstance(name_or_path, Path) or "/" in key:
            raise DataError(path, "split file not found")
        raise ValueError(f"no committed split {key!r}; committed: {', '.join(sorted(COMMITTED))} "
                         "(or pass the path of a split .json file)")
    try:
        return Split.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(path, f"invalid split file: {err}") from err


def default_split(dataset: str, cases: Sequence[Case], *, seed: int = DEFAULT_SEED) -> Split:
    """The split to use for ``dataset``: the committed one, else the documented default."""
    if dataset in COMMITTED:
        return load_split(dataset)
    ids = [c.case_id for c in cases]
    if dataset == "drive":
        train = [c.case_id for c in cases if c.subset == "training"]
        test = sorted(c.case_id for c in cases if c.subset == "test")
        subsets = make_split(train, seed=seed, fractions={"train": 0.9, "val": 0.1})
        subsets["test"] = test
        return Split(dataset, f"official test set; val = 10 % of the official training images "
                              f"(seed {seed})", seed, {"train": 0.9, "val": 0.1}, None, subsets)
    subsets = make_split(ids, seed=seed, fractions=DEFAULT_FRACTIONS)
    return Split(dataset, f"make_split of the sorted case ids, seed {seed}, 80/10/10 %", seed,
                 dict(DEFAULT_FRACTIONS), None, subsets)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hidiff.data.splits <dataset> <root>``: rewrite the committed split file."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m hidiff.data.splits <kvasir-seg|chase-db1> <dataset root>",
              file=sys.stderr)
        return 2
    dataset, root = args
    cases = get_reader(dataset).list_cases(root)
    split = build_split(dataset, [c.case_id for c in cases])
    committed_split_path(dataset).write_text(split.to_json())
    print(f"wrote {committed_split_path(dataset)}: "
          + ", ".join(f"{k} {len(v)}" for k, v in split.subsets.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
