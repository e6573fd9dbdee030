"""``hidiff train`` options against the keywords of :func:`hidiff.training.train`."""

from __future__ import annotations

import argparse
import inspect

import pytest

from hidiff.training import train
from hidiff.training.arguments import add_train_arguments, train_kwargs

BASE = ["--dataset", "kvasir-seg", "--data", "d", "--preset", "tiny", "--out", "o"]


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p


def test_every_train_keyword_has_an_option_and_every_option_a_keyword(parser):
    """An option left out of ``train_kwargs``'s names would be dropped silently, a misspelt one
    would fail only when a run starts: the option destinations are exactly train()'s keywords
    (``quiet`` is ``progress`` inverted)."""
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    keywords = set(inspect.signature(train).parameters)
    assert dests - {"quiet"} == keywords - {"progress"}
    every = train_kwargs(parser.parse_args(BASE))
    assert set(every) <= keywords


def test_given_options_reach_the_keywords_and_absent_ones_are_left_out(parser):
    given = train_kwargs(parser.parse_args([*BASE, "--self-align", "0.25", "--y0-term",
                                            "refiner", "--lambda-y0", "0", "--grad-clip", "0",
                                            "--refine-after-minutes", "12", "--quiet"]))
    assert given["refine_after_minutes"] == 12.0 and "refine_after_steps" not in given
    assert given["self_align"] == 0.25 and given["y0_term"] == "refiner"
    assert given["lambda_y0"] == 0.0 and given["grad_clip"] is None  # 0 = no clipping
    assert given["progress"] is False
    plain = train_kwargs(parser.parse_args(BASE))  # train()'s defaults (or a resume's) apply
    assert "self_align" not in plain and "lr" not in plain
    assert plain["resume"] is False and plain["progress"] is True
    with pytest.raises(SystemExit):
        parser.parse_args([*BASE, "--pretrain-steps", "-1"])
