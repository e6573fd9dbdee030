"""The X-Former: token layout, permutation equivariance, binarized attention map, init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hidiff.xformer as xf
from hidiff.layers import BinaryLinear
from hidiff.xformer import (
    CrossAttentionBlock,
    XFormer,
    from_tokens,
    hard_attention,
    to_tokens,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: extra intra-op threads only oversubscribe a shared 2-core box
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _buggy_from_tokens(tokens, height, width):
    """The official code's defect: reshape without the transpose."""
    n, _, e = tokens.shape
    return tokens.reshape(n, e, height, width)


def _distinct_map(n=2, e=3, h=4, w=5):
    return torch.arange(n * e * h * w, dtype=torch.float32).reshape(n, e, h, w)


def test_token_round_trip_distinct_positions():
    x = _distinct_map()
    tokens = to_tokens(x)
    assert tokens.shape == (2, 20, 3)
    for i in range(4):
        for j in range(5):
            assert torch.equal(tokens[:, i * 5 + j, :], x[:, :, i, j])
    assert torch.equal(from_tokens(tokens, 4, 5), x)
    # the test set-up would catch the reshape-without-transpose defect
    assert not torch.equal(_buggy_from_tokens(tokens, 4, 5), x)


def test_tokenwise_op_equals_1x1_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 7)
    lin = nn.Linear(6, 4)
    via_tokens = from_tokens(lin(to_tokens(x)), 3, 7)
    conv = nn.functional.conv2d(x, lin.weight[:, :, None, None], lin.bias)
    torch.testing.assert_close(via_tokens, conv)
    assert not torch.allclose(_buggy_from_tokens(lin(to_tokens(x)), 3, 7), conv)


def _permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    n, e, h, w = x.shape
    return x.flatten(2)[:, :, perm].reshape(n, e, h, w)


@pytest.mark.parametrize(
    ("binary", "attention"),
    [(True, "hard"), (True, "softmax"), (False, "hard"), (False, "softmax")],
)
def test_xformer_equivariant_under_spatial_permutation(binary, attention):
    torch.manual_seed(1)
    model = XFormer(16, 4, binary=binary, attention=attention).eval()
    f_d, f_p = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 3, 5)
    perm = torch.randperm(15)
    with torch.no_grad():
        out_d, out_p = model(f_d, f_p)
        pout_d, pout_p = model(_permute(f_d, perm), _permute(f_p, perm))
    torch.testing.assert_close(pout_d, _permute(out_d, perm), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pout_p, _permute(out_p, perm), atol=1e-5, rtol=1e-5)
    assert out_d.shape == f_d.shape and out_p.shape == f_p.shape
    assert not torch.allclose(out_d, f_d)


def test_equivariance_test_catches_transpose_bug(monkeypatch):
    torch.manual_seed(1)
    monkeypatch.setattr(xf, "from_tokens", _buggy_from_tokens)
    model = XFormer(16, 4, binary=False, attention="softmax").eval()
    f_d, f_p = torch.randn(1, 16, 3, 5), torch.randn(1, 16, 3, 5)
    perm = torch.randperm(15)
    with torch.no_grad():
        out_d, _ = model(f_d, f_p)
        pout_d, _ = model(_permute(f_d, perm), _permute(f_p, perm))
    assert not torch.allclose(pout_d, _permute(out_d, perm), atol=1e-4)


def test_hard_attention_values():
    probs = torch.tensor([[0.5, 0.2, 0.1, 0.2], [0.9, 0.05, 0.03, 0.02]])
    out = hard_attention(probs, 0.35)
    expected = torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_hard_attention_rows_normalised_and_softmax_straight_through():
    torch.manual_seed(2)
    scores = torch.randn(2, 3, 7, 9, requires_grad=True)
    weights = torch.randn(2, 3, 7, 9)
    hard = hard_attention(torch.softmax(scores, -1), 0.35)
    torch.testing.assert_close(hard.sum(-1), torch.ones(2, 3, 7))
    selected = (hard > 0).sum(-1).to(torch.float32)
    torch.testing.assert_close(hard, (hard > 0).to(torch.float32) / selected[..., None])
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), scores)
    ref = scores.detach().clone().requires_grad_(True)
    (g_soft,) = torch.autograd.grad((torch.softmax(ref, -1) * weights).sum(), ref)
    torch.testing.assert_close(g_hard, g_soft)


def test_init_runs_and_projection_types():
    torch.manual_seed(3)
    model = XFormer(64, 4, binary=True)
    twin = XFormer(64, 4, binary=False)
    for block in (model.seg_block, model.diff_block):
        for name in ("q", "k", "v", "fc1"):
            assert isinstance(getattr(block, name), BinaryLinear)
        assert not isinstance(block.proj, BinaryLinear)
        assert not isinstance(block.fc2, BinaryLinear)
    assert not any(isinstance(m, BinaryLinear) for m in twin.modules())
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.abs().max() <= 0.04 + 1e-6
            assert 0.01 < m.weight.std().item() < 0.025
            if m.bias is not None:
                assert torch.all(m.bias == 0)
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    names = {k: v.shape for k, v in model.named_parameters()}
    assert names == {k: v.shape for k, v in twin.named_parameters()}


def test_precompute_matches_forward_and_gradients_flow():
    torch.manual_seed(4)
    model = XFormer(16, 2, binary=True)
    f_d = torch.randn(2, 16, 4, 4, requires_grad=True)
    f_p = torch.randn(2, 16, 4, 4, requires_grad=True)
    out_d, out_p = model(f_d, f_p)
    cached_d, cached_p = model.forward_cached(f_d, model.precompute(f_p))
    assert torch.equal(out_d, cached_d) and torch.equal(out_p, cached_p)
    (out_d.square().sum() + out_p.square().sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert f_d.grad.abs().sum() > 0 and f_p.grad.abs().sum() > 0


def test_cross_attention_updates_kv_stream_at_query_positions():
    torch.manual_seed(5)
    block = CrossAttentionBlock(8, 2, binary=False, attention="softmax")
    x_q, x_kv = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    with pytest.raises(ValueError):
        block(x_q, torch.randn(1, 5, 8))
    out = block(x_q, x_kv)
    assert out.shape == x_kv.shape
