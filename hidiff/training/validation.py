"""Validation during training: Dice of the segmentor alone (no refinement).

Resize-policy datasets are predicted at the model's image size (the dataset resizes); tile-policy
datasets are predicted whole at native resolution with overlapping tiles
(:mod:`reference.images`). The mask is ``prob > 0.5`` for K = 1, the argmax over channels for
K > 1 (Dice averaged over the foreground classes). Cases where prediction and ground truth are
both empty (Dice undefined, ``reference.metrics``) are left out of the mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from hidiff.segmentor import prior_from_logits
from reference.images import extract_tiles, stitch_tiles
from reference.metrics import dice
from reference.sampling import final_labels

__all__ = ["segmentor_dice", "segmentor_prob"]


def _channel_masks(prob: np.ndarray) -> np.ndarray:
    """(K, H, W) probabilities -> (K, H, W) bool masks of :func:`reference.final_labels`'s
    label map (K = 1: the foreground; K > 1: one-hot)."""
    labels = final_labels(prob[None])[0]
    if prob.shape[0] == 1:
        return (labels == 1)[None]
    return np.arange(prob.shape[0]).reshape(-1, 1, 1) == labels[None]


@torch.no_grad()
def segmentor_prob(segmentor: nn.Module, image: Tensor, *, tile: int | None = None,
                   overlap: int = 0, batch_size: int = 8) -> np.ndarray:
    """Prior p (K, H, W) of one (C, H, W) image; tiled when ``tile`` is given."""
    device = next(segmentor.parameters()).device
    if tile is None:
        logits = segmentor(image[None].to(device)).logits
        return prior_from_logits(logits)[0].float().cpu().numpy()
    tiles, starts = extract_tiles(image.permute(1, 2, 0).numpy(), tile, overlap)
    batch = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    probs = [prior_from_logits(segmentor(batch[i:i + batch_size].to(device)).logits).cpu()
             for i in range(0, len(batch), batch_size)]
    return stitch_tiles(torch.cat(probs).numpy(), starts, image.shape[1:], channels_first=True)


@torch.no_grad()
def segmentor_dice(segmentor: nn.Module, dataset, *, max_cases: int | None = None) -> float:
    """Mean Dice of the segmentor alone over an evaluation ``SegmentationDataset``.

    The segmentor is put in eval mode for the pass and its mode restored afterwards.
    """
    was_training = segmentor.training
    segmentor.eval()
    info = dataset.info
    tiled = info.policy == "tile"
    scores = []
    try:
        for index in range(len(dataset) if max_cases is None else min(max_cases, len(dataset))):
            item = dataset[index]
            prob = segmentor_prob(segmentor, item["image"],
                                  tile=dataset.crop if tiled else None,
                                  overlap=min(info.overlap, dataset.crop - 1) if tiled else 0)
            pred = _channel_masks(prob)
            gt = item["mask"].numpy() > 0.5
            channels = range(pred.shape[0]) if pred.shape[0] == 1 else range(1, pred.shape[0])
            per_class = [dice(pred[k], gt[k]) for k in channels]
            per_class = [d for d in per_class if not math.isnan(d)]
            if per_class:
                scores.append(float(np.mean(per_class)))
    finally:
        segmentor.train(was_training)
    return float(np.mean(scores)) if scores else math.nan
