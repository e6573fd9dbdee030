"""Segmentor loss: Dice + (B)CE, sigmoid for K = 1 and softmax for K > 1 (method §1, §6)."""

import pytest
import torch
import torch.nn.functional as F

from hidiff.seg_loss import segmentation_loss, soft_dice_loss


def test_binary_loss_is_dice_plus_bce():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    prob = torch.sigmoid(logits)
    want = soft_dice_loss(prob, target) + F.binary_cross_entropy(prob, target)
    torch.testing.assert_close(segmentation_loss(logits, target), want)


def test_single_channel_prior_is_not_a_softmax():
    # the official code's softmax over one channel makes p identically 1; ours must depend on x
    logits = torch.tensor([[[[-5.0, 5.0]]]])
    target = torch.tensor([[[[0.0, 1.0]]]])
    assert segmentation_loss(logits, target) < 0.1


def test_multiclass_uses_softmax_ce():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    target = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    want = soft_dice_loss(torch.softmax(logits, 1), target) + F.cross_entropy(logits, labels)
    torch.testing.assert_close(segmentation_loss(logits, target), want)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        segmentation_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 3))
