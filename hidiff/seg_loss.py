"""Segmentor objective (method §6): L_seg = lambda_dice * Dice loss + cross-entropy.

For K = 1 (binary tasks) the probability is sigmoid(logits) and the cross-entropy is the binary
cross-entropy; for K > 1 the probability is the softmax over channels and the targets are one-hot.

    soft Dice loss = 1 - mean_k [ (2 sum(p_k y_k) + s) / (sum p_k + sum y_k + s) ],  s = 1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss over (N, K, H, W) probabilities and targets, averaged over N and K."""
    dims = tuple(range(2, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, *, lambda_dice: float = 1.0
) -> torch.Tensor:
    """``lambda_dice * Dice + CE`` for logits (N, K, H, W) and a (N, K, H, W) 0/1 target."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if logits.shape[1] == 1:
        prob = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, target)
    else:
        prob = torch.softmax(logits, dim=1)
        ce = F.cross_entropy(logits, target.argmax(dim=1))
    return lambda_dice * soft_dice_loss(prob, target) + ce
