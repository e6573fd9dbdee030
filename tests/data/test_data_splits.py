"""Committed split files, make_split and load_split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hidiff.data import DataError, chase_subject, get_reader, load_split, make_split
from hidiff.data.info import Case
from hidiff.data.splits import (
    COMMITTED,
    build_split,
    committed_split_path,
    default_split,
)


@pytest.mark.data
def test_kvasir_split_regenerates_from_the_data(kvasir_root):
    ids = [c.case_id for c in get_reader("kvasir-seg").list_cases(kvasir_root)]
    split = build_split("kvasir-seg", ids)
    assert split.to_json() == committed_split_path("kvasir-seg").read_text()
    loaded = load_split("kvasir-seg")
    assert loaded.seed == 42 and loaded.rule
    assert [len(loaded[n]) for n in ("train", "val", "test")] == [800, 100, 100]
    assert sorted(loaded["train"] + loaded["val"] + loaded["test"]) == sorted(ids)


@pytest.mark.data
def test_chase_split_regenerates_from_the_data(chase_root):
    cases = get_reader("chase-db1").list_cases(chase_root)
    split = build_split("chase-db1", [c.case_id for c in cases])
    assert split.to_json() == committed_split_path("chase-db1").read_text()
    loaded = load_split("chase-db1")
    assert loaded.group_by == "subject" and loaded.seed is None
    subjects = {name: {chase_subject(i) for i in loaded[name]} for name in loaded.names}
    assert subjects == {"train": {f"{n:02d}" for n in range(1, 10)}, "val": {"10"},
                        "test": {"11", "12", "13", "14"}}
    assert len(loaded["train"]) + len(loaded["val"]) == 20 and len(loaded["test"]) == 8
    assert [c.case_id for c in loaded.select(cases, "test")] == loaded["test"]


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_files_are_consistent(name):
    data = json.loads(committed_split_path(name).read_text())
    assert data["dataset"] == name and "rule" in data and "seed" in data
    split = load_split(name)
    ids = [i for subset in split.names for i in split[subset]]
    assert len(ids) == len(set(ids))  # no case in two subsets
    if name == "chase-db1":  # the two eyes of a subject are never split
        owner = {chase_subject(i): n for n in split.names for i in split[n]}
        for n in split.names:
            assert all(owner[chase_subject(i)] == n for i in split[n])
    assert build_split(name, ids).to_json() == committed_split_path(name).read_text()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_make_split_partitions_deterministically(n, seed):
    ids = [f"id{i:03d}" for i in range(n)]
    first = make_split(reversed(ids), seed=seed, fractions={"a": 0.7, "b": 0.2, "c": 0.1})
    assert first == make_split(ids, seed=seed, fractions={"a": 0.7, "b": 0.2, "c": 0.1})
    assert sorted(sum(first.values(), [])) == ids
    assert all(part == sorted(part) for part in first.values())
    assert abs(len(first["a"]) - 0.7 * n) < 1 + 1e-9


def test_make_split_groups_and_counts():
    ids = [f"Image_{s:02d}{e}" for s in range(1, 8) for e in "LR"]
    split = make_split(ids, seed=3, fractions={"train": 5, "test": 2}, group_fn=chase_subject)
    assert len(split["train"]) == 10 and len(split["test"]) == 4
    assert not {chase_subject(i) for i in split["train"]} & {chase_subject(i)
                                                              for i in split["test"]}
    ordered = make_split(ids, seed=None, fractions={"train": 5, "test": 2},
                         group_fn=chase_subject)
    assert ordered["test"] == ["Image_06L", "Image_06R", "Image_07L", "Image_07R"]
    assert make_split(ids, seed=3, fractions={"a": 0.5, "b": 0.5}) != make_split(
        ids, seed=4, fractions={"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="sum to 1"):
        make_split(ids, seed=0, fractions={"a": 0.5, "b": 0.2})
    with pytest.raises(ValueError, match="sum to the"):
        make_split(ids, seed=0, fractions={"a": 3, "b": 2}, group_fn=chase_subject)
    with pytest.raises(ValueError, match="duplicate"):
        make_split(["a", "a", "b"], seed=0)


def test_default_splits(drive_root, cvc_root):
    drive_cases = get_reader("drive").list_cases(drive_root)
    split = default_split("drive", drive_cases)
    assert split["test"] == ["01", "02"]
    assert sorted(split["train"] + split["val"]) == ["21", "22"] and len(split["val"]) == 0
    cvc_cases = get_reader("cvc-clinicdb").list_cases(cvc_root)
    split = default_split("cvc-clinicdb", cvc_cases)
    assert sorted(sum((split[n] for n in split.names), [])) == ["1", "10", "2"]
    assert default_split("cvc-clinicdb", cvc_cases) == split


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="committed: chase-db1, kvasir-seg"):
        load_split("drive")
    with pytest.raises(DataError, match="nope.json"):
        load_split(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "x", "subsets": {"train": ["a"], "test": ["a"]}}))
    with pytest.raises(DataError, match="bad.json.*'a' is in both"):
        load_split(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"dataset": "x", "subsets": {"train": ["a"], "test": ["b"]}}))
    split = load_split(str(good))
    with pytest.raises(DataError, match="not in the data"):
        split.select([Case("a", tmp_path / "a.png", tmp_path / "a_m.png")], "test")
