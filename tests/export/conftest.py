"""Fixtures of the export tests: a "tiny" model folder with random networks, exported once.

The networks are randomly initialised, but the layers the networks initialise to zero (the
step-conditioning Linears of TB / TA / FiLM, the refiner head) and the batch-norm statistics are
re-drawn: with them at zero every refiner output would be 0.5 and every step table would be zero,
and the export would be tested on nothing.
"""

from __future__ import annotations

from pathlib import Path

import model_factory
import numpy as np
import pytest
import torch
from model_factory import randomize_
from PIL import Image

from hidiff.data.info import DatasetInfo


def make_model_dir(folder: Path, name: str = "tiny", *, fp_twin: bool = True,
                   checkpoint: bool = True, config=None, labels=None) -> Path:
    """:func:`model_factory.make_model_dir` with ``labels`` for the dataset description."""
    info = None if labels is None else DatasetInfo("test", labels)
    return model_factory.make_model_dir(folder, name, config=config, fp_twin=fp_twin,
                                        checkpoint=checkpoint, dataset_info=info)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny networks gain nothing from intra-op threads; spinning ones crawl on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def randomize():
    """:func:`randomize_` (tests import nothing from conftest: it is not on the path)."""
    return randomize_


@pytest.fixture(scope="session")
def model_dir_factory():
    """:func:`make_model_dir`."""
    return make_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory):
    """``export_model_dir`` of the tiny folder (opset 17, IR 10): the ExportResult."""
    from export import export_model_dir

    return export_model_dir(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from export.api import load_model

    return load_model(tiny_model_dir)


def read_kvasir(root: Path, count: int, size: int, mean, std) -> np.ndarray:
    """``count`` Kvasir-SEG images (sorted by name): PIL bilinear resize, [0, 1], normalised."""
    files = sorted((root / "images").glob("*.jpg"))[:count]
    out = []
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x = np.asarray(rgb, dtype=np.float32) / 255.0
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="session")
def kvasir_images(kvasir_root, tiny_export) -> np.ndarray:
    """Two real images at the tiny model's size, normalised as its manifest says."""
    facts = tiny_export.manifest["model"]
    norm = facts["normalization"]
    return read_kvasir(kvasir_root, 2, facts["input_size"][0], norm["mean"], norm["std"])
