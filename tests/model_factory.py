"""Model folders with random networks, as ``hidiff train`` writes them, for the export, edge and
LCE tests (importable: ``tests/`` is on the test path).

The networks are seeded-random, but the layers hidiff initialises to zero (the step-conditioning
Linears of TB / TA / FiLM, the refiner head) and the batch-norm statistics are re-drawn: with them
at zero every refiner output would be 0.5, every step table zero, and the comparisons would test
nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hidiff.checkpoint import save_checkpoint
from hidiff.config import preset
from hidiff.data.info import DatasetInfo
from hidiff.data.splits import load_split
from hidiff.model_dir import CHECKPOINT, build_networks, write_model_files
from hidiff.training.setup import model_dataset_info


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw zero-initialised parameters and the batch-norm statistics (in place); eval mode."""
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


def make_model_dir(folder: Path, name: str = "tiny", *, config=None, seed: int = 0,
                   fp_twin: bool = True, checkpoint: bool = True,
                   dataset_info: DatasetInfo | None = None) -> Path:
    """A model folder with random networks of preset ``name`` (or of ``config``), described by
    ``dataset_info`` (default: Kvasir-SEG's)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = preset(name) if config is None else config
    torch.manual_seed(seed)
    nets = build_networks(config, fp_twin=fp_twin)
    for i, net in enumerate(nets):
        if net is not None:
            randomize_(net, seed=seed + i)
    seg, ref, ref_fp = nets
    info = DatasetInfo(name="kvasir-seg") if dataset_info is None else dataset_info
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
