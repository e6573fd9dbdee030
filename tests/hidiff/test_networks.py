"""Segmentor, refiner (binary and full-precision twin), step embedding, size/cost accounting."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest
import torch
from torch import nn

from hidiff.config import preset
from hidiff.describe import build_models, count_macs, count_parameters, describe
from hidiff.embedding import StepEmbedding
from hidiff.layers import BinaryConv2d, BinaryLinear
from hidiff.refiner import BinaryRefiner
from hidiff.segmentor import Segmentor, SegmentorOutput, UNetSegmentor, prior_from_logits

HIDIFF_DIR = Path(__file__).resolve().parents[2] / "hidiff"


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests are small; on a 2-core box shared with other jobs, intra-op threads only
    # oversubscribe the cores (measured 3-10x slower).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _inputs(cfg, n, seg, *, requires_grad=False):
    s = cfg.image_size
    x = torch.randn(n, cfg.in_channels, s, s)
    out = seg(x)
    prior = prior_from_logits(out.logits)
    y_t = (torch.rand_like(prior) < prior).to(torch.float32)
    t = torch.randint(1, cfg.diffusion.num_steps + 1, (n,))
    return x, out, prior, y_t, t


def _randomize(module: nn.Module, std: float = 0.05) -> None:
    """Perturb every parameter so zero-initialised heads / step linears pass gradients on."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


# -- segmentor --------------------------------------------------------------------------------


def test_prior_from_logits_sigmoid_for_one_class_softmax_otherwise():
    logits = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(prior_from_logits(logits), torch.sigmoid(logits))
    assert prior_from_logits(logits).min() < 0.99  # never softmax over one channel (p == 1)
    logits3 = torch.randn(2, 3, 4, 4)
    p3 = prior_from_logits(logits3)
    torch.testing.assert_close(p3.sum(1), torch.ones(2, 4, 4))
    torch.testing.assert_close(p3, torch.softmax(logits3, 1))


@pytest.mark.parametrize(("name", "batch"), [("tiny", 2), ("cpu-small", 2), ("cpu-base", 1)])
def test_segmentor_shapes_and_backward(name, batch):
    cfg = preset(name, num_classes=2 if name == "tiny" else 1)
    seg = UNetSegmentor(cfg.segmentor)
    assert isinstance(seg, Segmentor)
    s = cfg.image_size
    out = seg(torch.randn(batch, 3, s, s))
    assert isinstance(out, SegmentorOutput)
    assert out.logits.shape == (batch, cfg.num_classes, s, s)
    assert seg.feature_strides == tuple(2**i for i in range(cfg.segmentor.depth + 1))
    for f, c, st in zip(out.features, seg.feature_channels, seg.feature_strides, strict=True):
        assert f.shape == (batch, c, s // st, s // st)
    (out.logits.square().mean() + sum(f.mean() for f in out.features)).backward()
    assert all(p.grad is not None for p in seg.parameters())


def test_segmentor_feature_subset_and_transpose_up():
    cfg = preset("tiny")
    seg_cfg = cfg.segmentor.__class__(
        base_channels=8, depth=3, feature_strides=(2, 8), up_mode="transpose", max_channels=32
    )
    seg = UNetSegmentor(seg_cfg)
    out = seg(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in out.features] == [32, 8]
    assert seg.feature_channels == (16, 32)


# -- refiner ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "batch"), [("tiny", 2), ("cpu-small", 2), ("cpu-base", 1)])
def test_refiner_forward_backward_at_preset_shapes(name, batch):
    torch.manual_seed(0)
    cfg = preset(name)
    seg, ref = build_models(cfg)
    x, out, prior, y_t, t = _inputs(cfg, batch, seg)
    logits = ref(x, y_t, prior, out.features, t)
    assert logits.shape == (batch, cfg.num_classes, cfg.image_size, cfg.image_size)
    assert torch.all(logits == 0)  # zero-initialised head: eps_hat = 0.5 at the start
    (logits.sum() + prior.mean()).backward()
    assert ref.head.weight.grad.abs().sum() > 0


def test_paper_preset_forward_full_size_batch_1():
    torch.manual_seed(0)
    cfg = preset("paper")
    seg, ref = build_models(cfg)
    seg.eval()
    ref.eval()
    with torch.no_grad():
        x, out, prior, y_t, t = _inputs(cfg, 1, seg)
        _randomize(ref.head, 0.01)
        logits = ref(x, y_t, prior, out.features, t)
    assert logits.shape == (1, 1, 256, 256)
    assert torch.isfinite(logits).all()


def test_refiner_init_is_explicit():
    _, ref = build_models(preset("tiny"))
    for name, p in ref.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("bias"):
            assert torch.all(p == 0), name
    for m in ref.modules():
        if isinstance(m, BinaryConv2d | BinaryLinear):
            assert m.weight.abs().max() <= 1 and m.weight.std() > 0


@pytest.mark.parametrize("num_classes", [1, 3])
def test_gradients_reach_every_parameter(num_classes):
    torch.manual_seed(1)
    cfg = preset("tiny", num_classes=num_classes)
    seg, ref = build_models(cfg)
    _randomize(ref)
    x, out, prior, y_t, t = _inputs(cfg, 2, seg)
    logits = ref(x, y_t, prior, out.features, t)
    (logits.square().mean() + logits.mean()).backward()
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"refiner.{name}"
    # the diffusion loss flows back into the segmentor through the prior and the features
    for name, p in seg.named_parameters():
        if name.startswith("head."):  # logits -> prior -> refiner stem
            assert p.grad is not None and p.grad.abs().sum() > 0, f"segmentor.{name}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.encoder.parameters())


def test_twin_has_same_parameters_and_no_binary_layers():
    cfg = preset("tiny")
    seg, ref = build_models(cfg)
    _, twin = build_models(cfg, binary=False)
    assert ref.binary and not twin.binary
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert shapes == {k: v.shape for k, v in twin.state_dict().items()}
    assert any(isinstance(m, BinaryConv2d) for m in ref.modules())
    assert any(isinstance(m, BinaryLinear) for m in ref.modules())
    assert not any(isinstance(m, BinaryConv2d | BinaryLinear) for m in twin.modules())
    # the twin loads the binary model's weights and computes something different
    twin.load_state_dict(ref.state_dict())
    _randomize(ref.head, 0.1)
    twin.head.load_state_dict(ref.head.state_dict())
    ref.eval()
    twin.eval()
    with torch.no_grad():
        x, out, prior, y_t, t = _inputs(cfg, 1, seg)
        assert not torch.allclose(
            ref(x, y_t, prior, out.features, t), twin(x, y_t, prior, out.features, t)
        )


@pytest.mark.parametrize("train", [False, True])
def test_precompute_forward_step_equals_forward(train):
    torch.manual_seed(2)
    cfg = preset("tiny")
    seg, ref = build_models(cfg)
    _randomize(ref)
    ref.train(train)
    with torch.no_grad():
        x, out, prior, y_t, t = _inputs(cfg, 2, seg)
        cache = ref.precompute(x, prior, out.features)
        for step in (cfg.diffusion.num_steps, 1):
            tt = torch.full((2,), step)
            y = (torch.rand_like(prior) < 0.5).to(torch.float32)
            assert torch.equal(ref(x, y, prior, out.features, tt), ref.forward_step(cache, y, tt))
        a = ref.forward_step(cache, y_t, torch.full((2,), 1))
        b = ref.forward_step(cache, y_t, torch.full((2,), 9))
        assert not torch.equal(a, b)  # the step embedding matters


@pytest.mark.parametrize(
    "changes",
    [
        dict(use_image=False, parameterization="y0"),
        dict(attention="softmax", pad_value=0.0),
        dict(use_xformer=False),
        dict(blocks_per_level=2, channel_mults=(1, 2, 4)),
    ],
)
def test_refiner_variants(changes):
    import dataclasses

    torch.manual_seed(3)
    cfg = preset("tiny", num_classes=2)
    cfg = cfg.replace(refiner=dataclasses.replace(cfg.refiner, **changes))
    seg, ref = build_models(cfg)
    _randomize(ref)
    x, out, prior, y_t, t = _inputs(cfg, 2, seg)
    logits = ref(x, y_t, prior, out.features, t)
    assert logits.shape == (2, 2, 64, 64)
    logits.mean().backward()
    if not cfg.refiner.use_xformer:
        assert ref.xformer is None and ref.injected[-1] is not None


def test_xformer_uses_nearest_feature_when_bottleneck_stride_missing():
    cfg = preset("tiny")
    seg_cfg = cfg.segmentor.__class__(
        base_channels=8, depth=3, feature_strides=(1, 2), max_channels=32
    )
    seg = UNetSegmentor(seg_cfg)
    ref = BinaryRefiner(
        cfg.refiner,
        num_classes=1,
        image_channels=3,
        feature_channels=seg.feature_channels,
        feature_strides=seg.feature_strides,
    )
    assert ref.xformer_feature == 1 and ref.injected == (0, 1, None, None)
    x, out, prior, y_t, t = _inputs(cfg, 1, seg)
    assert ref(x, y_t, prior, out.features, t).shape == (1, 1, 64, 64)


def test_refiner_rejects_float_t():
    cfg = preset("tiny")
    seg, ref = build_models(cfg)
    x, out, prior, y_t, _ = _inputs(cfg, 1, seg)
    with pytest.raises(ValueError, match="integer"):
        ref(x, y_t, prior, out.features, torch.ones(1))


# -- step embedding ---------------------------------------------------------------------------


def test_step_embedding_table_and_distinct_steps():
    emb = StepEmbedding(32, 16)
    table = emb.table(10)
    assert table.shape == (10, 32)
    torch.testing.assert_close(emb(torch.tensor([1, 5, 10])), table[[0, 4, 9]])
    assert torch.cdist(table, table).fill_diagonal_(1.0).min() > 0


# -- size and cost ----------------------------------------------------------------------------


def test_parameter_and_mac_counts_binary_vs_twin():
    cfg = preset("tiny")
    seg, ref = build_models(cfg)
    _, twin = build_models(cfg, binary=False)
    pb, pt = count_parameters(ref), count_parameters(twin)
    expected_binary = sum(
        m.weight.numel() for m in ref.modules() if isinstance(m, BinaryConv2d | BinaryLinear)
    )
    assert pb.binary == expected_binary > 0
    assert pt.binary == 0 and pt.total == pb.total
    mb, mt = count_macs(ref, cfg), count_macs(twin, cfg)
    assert mb.binary > mb.real > 0 and mt.binary == 0 and mt.real == mb.total
    full = count_macs(ref, cfg, part="full")
    pre = count_macs(ref, cfg, part="precompute")
    assert full.total == pre.total + mb.total
    assert count_macs(seg, cfg).binary == 0
    # one 3x3 binary conv at stride 1: 8 -> 8 channels over 64 x 64 positions
    conv = ref.encoder[0].blocks[0].conv
    assert isinstance(conv, BinaryConv2d)
    assert mb.binary >= 8 * 8 * 9 * 64 * 64
    text = describe(cfg)
    assert "refiner step" in text and "segmentor" in text


# -- sign convention --------------------------------------------------------------------------


def _sign_calls(src: str, name: str = "<src>") -> list[str]:
    """``x.sign(`` / ``torch.sign(`` / ``.sgn(`` / ``import sign`` in code, not strings/comments."""
    toks = [
        tok
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE)
    ]
    found = []
    for prev, tok, nxt in zip(toks, toks[1:], toks[2:], strict=False):
        if prev.string == "." and tok.string in ("sign", "sign_", "sgn") and nxt.string == "(":
            found.append(f"{name}:{tok.start[0]}")
        if tok.string in ("sign", "sgn") and prev.string == "import":
            found.append(f"{name}:{tok.start[0]}")
    return found


def test_sign_detector_self_check():
    assert _sign_calls("y = torch.sign(x)\n")
    assert _sign_calls("y = x.sign()\n")
    assert _sign_calls("from torch import sign\n")
    assert not _sign_calls('"""never torch.sign(x)"""\n# x.sign()\ny = bipolar(x)\n')


def test_no_torch_sign_in_hidiff():
    files = sorted(HIDIFF_DIR.rglob("*.py"))
    assert files
    offenders = [hit for path in files for hit in _sign_calls(path.read_text(), path.name)]
    assert not offenders, f"torch.sign / .sign() used (sign(0) = 0): {offenders}"
