"""Fixtures of the edge-runtime tests: tiny model folders built with hidiff, exported once.

The networks are random (seeded), with the layers hidiff initialises to zero (step-conditioning
Linears, the refiner head) and the batch-norm statistics re-drawn, so that the refiner's output
depends on ``y_t`` and the step and the comparisons test something. Two folders: the Kvasir-like
``resize`` policy and a vessel-like ``tile`` policy (64 x 64 tiles, overlap 16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _randomize(module, seed: int):
    import torch
    from torch import nn

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


def make_model_dir(folder: Path, *, policy: str = "resize", preset_name: str = "tiny",
                   seed: int = 0, num_classes: int = 1) -> Path:
    """A model folder as ``hidiff train`` writes it, random networks of ``preset_name``
    (K = ``num_classes``: 1 a binary task, else background + K - 1 classes)."""
    import torch

    from hidiff.config import preset
    from hidiff.data.info import DatasetInfo
    from hidiff.data.splits import load_split
    from hidiff.training.checkpoint import save_checkpoint
    from hidiff.training.model_dir import CHECKPOINT, build_networks, write_model_files
    from hidiff.training.setup import model_dataset_info

    folder.mkdir(parents=True, exist_ok=True)
    config = preset(preset_name, num_classes=num_classes)
    torch.manual_seed(seed)
    nets = build_networks(config, fp_twin=True)
    for i, net in enumerate(nets):
        _randomize(net, seed=seed + i)
    seg, ref, ref_fp = nets
    labels = {"background": 0, **{f"class{k}": k for k in range(1, max(2, num_classes))}}
    info = DatasetInfo(name="kvasir-seg", labels=labels) if policy == "resize" else DatasetInfo(
        name="vessel-like", policy="tile", overlap=16, labels=labels)
    info = model_dataset_info(info, config.image_size)
    write_model_files(folder, config=config, dataset_info=info, split=load_split("kvasir-seg"))
    save_checkpoint(folder / CHECKPOINT, {
        "step": 0, "segmentor": seg.state_dict(), "refiner": ref.state_dict(),
        "refiner_fp": ref_fp.state_dict(),
    })
    return folder


@pytest.fixture(scope="session")
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export(tmp_path_factory, policy: str, num_classes: int = 1):
    from export import export_model_dir

    model_dir = make_model_dir(tmp_path_factory.mktemp(f"model_{policy}") / "tiny", policy=policy,
                               num_classes=num_classes)
    out = tmp_path_factory.mktemp(f"onnx_{policy}") / "tiny"
    export_model_dir(model_dir, out)
    return model_dir, out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, torch_one_thread) -> tuple[Path, Path]:
    """``(model folder, exported folder)`` of the tiny resize-policy model."""
    return _export(tmp_path_factory, "resize")


@pytest.fixture(scope="session")
def tiny_tile_export(tmp_path_factory, torch_one_thread) -> tuple[Path, Path]:
    """``(model folder, exported folder)`` of a tiny tile-policy model (64 px tiles)."""
    return _export(tmp_path_factory, "tile")


@pytest.fixture(scope="session")
def tiny_k3_export(tmp_path_factory, torch_one_thread) -> tuple[Path, Path]:
    """``(model folder, exported folder)`` of a tiny three-class (K = 3) model."""
    return _export(tmp_path_factory, "resize", num_classes=3)


@pytest.fixture(scope="session")
def run_edge_cli():
    """``run(args, blocked=())``: ``python -m edge_runtime.cli ARGS`` in a subprocess (with the
    modules in ``blocked`` made unimportable); returns the CompletedProcess."""

    def run(args, *, blocked=(), timeout: float = 240) -> subprocess.CompletedProcess:
        code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
                + "from edge_runtime.cli import main\nsys.exit(main(sys.argv[1:]))\n")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    return run
