"""Fixtures of the export tests: a "tiny" model folder with random networks, exported once.

The networks are randomly initialised, but the layers the networks initialise to zero (the
step-conditioning Linears of TB / TA / FiLM, the refiner head) and the batch-norm statistics are
re-drawn: with them at zero every refiner output would be 0.5 and every step table would be zero,
and the export would be tested on nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hidiff.config import preset
from hidiff.data.info import DatasetInfo
from hidiff.data.splits import load_split
from hidiff.training.checkpoint import save_checkpoint
from hidiff.training.model_dir import CHECKPOINT, build_networks, write_model_files
from hidiff.training.setup import model_dataset_info


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw zero-initialised parameters and the batch-norm statistics (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return module.eval()


def make_model_dir(folder: Path, name: str = "tiny", *, fp_twin: bool = True,
                   checkpoint: bool = True, config=None, labels=None) -> Path:
    """A model folder as ``hidiff train`` writes it, with random networks of preset ``name``
    (or of ``config``; ``labels`` for the dataset description)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = preset(name) if config is None else config
    torch.manual_seed(0)
    nets = build_networks(config, fp_twin=fp_twin)
    for i, net in enumerate(nets):
        if net is not None:
            randomize_(net, seed=i)
    seg, ref, ref_fp = nets
    info = DatasetInfo(name="kvasir-seg") if labels is None else DatasetInfo("test", labels)
    info = model_dataset_info(info, config.image_size)
    write_model_files(folder, config=config, dataset_info=info, split=load_split("kvasir-seg"))
    if checkpoint:
        save_checkpoint(folder / CHECKPOINT, {
            "step": 0,
            "segmentor": seg.state_dict(),
            "refiner": ref.state_dict(),
            "refiner_fp": None if ref_fp is None else ref_fp.state_dict(),
        })
    return folder


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
