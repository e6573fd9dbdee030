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


def make_model_dir(folder: Path, *, policy: str = "resize", preset_name: str = "tiny",
                   seed: int = 0, num_classes: int = 1) -> Path:
    """A model folder with random networks of ``preset_name`` (K = ``num_classes``: 1 a binary
    task, else background + K - 1 classes), Kvasir-like ``resize`` or vessel-like ``tile``."""
    from model_factory import make_model_dir as make

    from hidiff.config import preset
    from hidiff.data.info import DatasetInfo

    labels = {"background": 0, **{f"class{k}": k for k in range(1, max(2, num_classes))}}
    info = DatasetInfo(name="kvasir-seg", labels=labels) if policy == "resize" else DatasetInfo(
        name="vessel-like", policy="tile", overlap=16, labels=labels)
    return make(folder, preset_name, config=preset(preset_name, num_classes=num_classes),
                seed=seed, dataset_info=info)


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


@pytest.fixture(scope="module")
def refiner(tiny_export):
    """The exported tiny model (``edge_runtime.model.load_model``) and its refiner step."""
    from edge_runtime.model import load_model

    exported = load_model(tiny_export[1])
    return exported, exported.protos["refiner_step"]


@pytest.fixture(scope="session")
def wide_head_refiner(tmp_path_factory, torch_one_thread):
    """The exported tiny model with a 16-channel refiner (its head's 3 x 3 conv to one channel
    is then rewritten by ``narrow_conv``, as in the larger presets) and its refiner step."""
    import dataclasses

    from model_factory import make_model_dir as make

    from edge_runtime.model import load_model
    from export import export_model_dir
    from hidiff.config import preset

    config = preset("tiny")
    config = dataclasses.replace(config, refiner=dataclasses.replace(config.refiner,
                                                                     base_channels=16))
    model_dir = make(tmp_path_factory.mktemp("model_wide") / "tiny", config=config)
    out = tmp_path_factory.mktemp("onnx_wide") / "tiny"
    export_model_dir(model_dir, out)
    exported = load_model(out)
    return exported, exported.protos["refiner_step"]


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


def _kernel_paths() -> list[str]:
    from edge_runtime import _packed

    return [p for p in ("avx512", "avx2", "portable") if p in _packed.available_paths()]


@pytest.fixture(params=_kernel_paths())
def kernel_path(request):
    """Each kernel path this CPU runs as the default (the native passes follow it)."""
    from edge_runtime import _packed

    _packed.set_path(request.param)
    yield request.param
    _packed.set_path(None)
