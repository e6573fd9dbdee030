"""Model configs: presets, JSON round trip, validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hidiff.config import (
    DiffusionConfig,
    ModelConfig,
    RefinerConfig,
    SegmentorConfig,
    list_presets,
    preset,
)


def test_list_presets_names():
    assert list_presets() == ("paper", "cpu-base", "cpu-small", "tiny")


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("num_classes", [1, 3])
def test_preset_round_trip(name, num_classes):
    cfg = preset(name, num_classes=num_classes)
    assert cfg.preset == name
    assert cfg.num_classes == cfg.segmentor.num_classes == num_classes
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    d = json.loads(cfg.to_json())
    assert isinstance(d["refiner"]["channel_mults"], list)
    assert isinstance(ModelConfig.from_dict(d).refiner.channel_mults, tuple)


def test_preset_sizes():
    paper = preset("paper")
    assert (paper.image_size, paper.refiner.base_channels, paper.diffusion.num_steps) == (
        256,
        128,
        10,
    )
    assert paper.refiner.strides == (1, 2, 4, 8, 16, 32)
    assert preset("cpu-base").image_size == 256 and preset("cpu-base").refiner.base_channels == 32
    assert preset("cpu-small").refiner.base_channels == 16
    assert preset("tiny").image_size == 64 and preset("tiny").refiner.base_channels == 8


def test_defaults():
    cfg = ModelConfig()
    assert cfg.refiner.use_image and cfg.refiner.binary and cfg.refiner.parameterization == "eps"
    assert cfg.refiner.pad_value == 1.0 and cfg.refiner.attention == "hard"
    assert cfg.diffusion.schedule == "cosine" and cfg.diffusion.num_steps == 10
    assert cfg.diffusion.num_sampling_steps == 10
    assert DiffusionConfig(num_steps=10, sampling_steps=4).num_sampling_steps == 4
    assert cfg.diffusion.lambda_focal == 1.0


def test_frozen():
    cfg = preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image_size = 32  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.refiner.base_channels = 4  # type: ignore[misc]


def test_replace_num_classes_updates_segmentor():
    cfg = preset("tiny").replace(num_classes=4)
    assert cfg.num_classes == cfg.segmentor.num_classes == 4


def test_unknown_keys_named():
    d = preset("tiny").to_dict()
    d["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["refiner"]["widht"] = 3
    d["refiner"]["zzz"] = 3
    with pytest.raises(ValueError, match="widht, zzz"):
        ModelConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["diffusion"]["steps"] = 3
    with pytest.raises(ValueError, match="steps"):
        ModelConfig.from_dict(d)


def test_partial_dict_takes_defaults():
    cfg = ModelConfig.from_dict({"diffusion": {"sampler": "ancestral"}})
    assert cfg.diffusion.sampler == "ancestral" and cfg.diffusion.num_steps == 10
    # keys newer than the section mean what older folders meant; absent sections are defaults
    assert cfg.diffusion.sampling_estimate == "last" and cfg.refiner.offset == "bayes"
    assert ModelConfig.from_dict({}).diffusion.sampling_estimate == "trajectory"
    assert ModelConfig.from_dict({"refiner": {}}).refiner.offset == "none"


def test_sampling_estimate_default_and_configs_written_before_it():
    assert preset("tiny").diffusion.sampling_estimate == "trajectory"
    assert ModelConfig.from_dict(preset("tiny").to_dict()) == preset("tiny")
    old = preset("tiny").to_dict()
    del old["diffusion"]["sampling_estimate"]  # a model folder written before the choice
    assert ModelConfig.from_dict(old).diffusion.sampling_estimate == "last"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DiffusionConfig(schedule="linear"), "'cosine', 'linear_abar'"),
        (lambda: DiffusionConfig(sampler="euler"), "'ddim', 'ancestral'"),
        (lambda: DiffusionConfig(num_steps=0), "num_steps"),
        (lambda: DiffusionConfig(num_steps=5, sampling_steps=6), "sampling_steps"),
        (lambda: DiffusionConfig(lambda_focal=-1), "lambda_focal"),
        (lambda: DiffusionConfig(sampling_estimate="mean"), "'last', 'trajectory'"),
        (lambda: RefinerConfig(parameterization="v"), "'eps', 'y0'"),
        (lambda: RefinerConfig(attention="linear"), "'hard', 'softmax'"),
        (lambda: RefinerConfig(pad_value=-1.0), "pad_value"),
        (lambda: RefinerConfig(base_channels=0), "base_channels"),
        (lambda: RefinerConfig(channel_mults=()), "channel_mults"),
        (lambda: RefinerConfig(base_channels=10, xformer_heads=3), "xformer_heads"),
        (lambda: RefinerConfig(attention_threshold=1.5), "attention_threshold"),
        (lambda: RefinerConfig(binary="yes"), "binary"),
        (lambda: SegmentorConfig(up_mode="pixelshuffle"), "'bilinear', 'transpose'"),
        (lambda: SegmentorConfig(depth=3, feature_strides=(1, 16)), "feature_strides"),
        (lambda: SegmentorConfig(depth=3, feature_strides=(4, 2)), "feature_strides"),
        (lambda: ModelConfig(image_size=100), "divisible by 32"),
        (lambda: ModelConfig(num_classes=2), "num_classes"),
        (lambda: preset("huge"), "'paper', 'cpu-base', 'cpu-small', 'tiny'"),
    ],
)
def test_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_from_dict_rejects_non_dict_section():
    with pytest.raises(ValueError, match="refiner"):
        ModelConfig.from_dict({"refiner": [1, 2]})
