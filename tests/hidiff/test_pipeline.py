"""The torch inference pipeline against the NumPy oracle, with randomly initialised tiny networks.

``reference.reverse_process`` is driven by the same refiner (``forward_step`` wrapped in a NumPy
callable, the cache computed once like the pipeline does) and the same uniforms
(``reference.draw_uniforms``). Both do the diffusion arithmetic in float64 on the same float32
network outputs, so the masks must be equal exactly and the probabilities within PROB_ATOL (the
same float64 formulas; only the association order of a few operations could differ).

The zero-initialised refiner head would make every output 0.5; the heads are re-drawn so the
refiner and the prior say something.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import reference
from hidiff.config import DiffusionConfig, preset
from hidiff.data.info import DatasetInfo
from hidiff.pipeline import HiDiffPipeline, make_scheduler
from hidiff.refiner import BinaryRefiner
from hidiff.segmentor import UNetSegmentor
from reference.images import extract_tiles, normalize, resize_labels, resize_planes, stitch_tiles

PROB_ATOL = 1e-12
INFO = DatasetInfo(name="test", labels={"background": 0, "polyp": 1}, size=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks gain nothing from intra-op threads; spinning ones crawl on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(config, seed=0):
    torch.manual_seed(seed)
    seg = UNetSegmentor(config.segmentor)
    nn_kw = dict(
        num_classes=config.num_classes,
        image_channels=config.in_channels,
        feature_channels=seg.feature_channels,
        feature_strides=seg.feature_strides,
    )
    ref = BinaryRefiner(config.refiner, **nn_kw)
    fp = BinaryRefiner(config.refiner, binary=False, **nn_kw)
    torch.nn.init.normal_(seg.head.weight, std=0.3)
    for r in (ref, fp):
        torch.nn.init.normal_(r.head.weight, std=0.3)
    return seg.eval(), ref.eval(), fp.eval()


def _config(sampler="ddim", parameterization="eps", num_classes=1):
    cfg = preset("tiny", num_classes=num_classes)
    return cfg.replace(
        diffusion=DiffusionConfig(num_steps=10, sampler=sampler),
        refiner=dataclasses.replace(cfg.refiner, parameterization=parameterization),
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = _config()
    seg, ref, fp = _build(cfg)
    pipe = HiDiffPipeline(seg, ref, config=cfg, dataset_info=INFO, refiner_fp=fp)
    return pipe, seg, ref, fp


def _images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _oracle(seg, refiner, config, x, *, steps, seed, samples=1, estimate=None):
    """reference.reverse_process driven by ``refiner`` on the segmentor's prior: each chain's
    network call made separately, image by image, so the S-chain batching is checked too."""
    with torch.no_grad():
        so = seg(x)
        prior = seg.prior_from_logits(so.logits)
        cache = refiner.precompute(x, prior, so.features)
    n = x.shape[0]

    def denoise(y, step):
        outs = []
        for c in range(samples):
            t = torch.full((n,), step, dtype=torch.long)
            with torch.no_grad():
                out = refiner.forward_step(cache, torch.from_numpy(y[c * n:(c + 1) * n]).float(),
                                           t)
            outs.append(torch.sigmoid(out).double().numpy())
        return np.concatenate(outs)

    schedule = make_scheduler(config, steps).diffusion.schedule
    uniforms = reference.chain_uniforms(seed, tuple(prior.shape), schedule.num_steps, samples)
    result = reference.reverse_process(
        prior.double().numpy(),
        denoise,
        schedule=schedule,
        uniforms=uniforms,
        method=config.diffusion.sampler,
        parameterization=config.refiner.parameterization,
        offset=config.refiner.offset,
        samples=samples,
        estimate=config.diffusion.sampling_estimate if estimate is None else estimate,
    )
    return result.y0_hat


def _check_against_oracle(pipe, seg, refiner, config, *, which, steps, seed, x, samples=1,
                          estimate=None):
    got = pipe.predict(x, steps=steps, seed=seed, refiner=which, samples=samples,
                       estimate=estimate)
    y0_hat = _oracle(seg, refiner, config, x, steps=steps, seed=seed, samples=samples,
                     estimate=estimate)
    want_mask = reference.final_mask(y0_hat)
    if want_mask.ndim == 4:  # K = 1 keeps the channel axis
        want_mask = want_mask[:, 0]
    np.testing.assert_array_equal(got.mask.numpy(), want_mask)
    np.testing.assert_allclose(got.prob.numpy(), y0_hat, rtol=0, atol=PROB_ATOL)
    assert got.prob.dtype == torch.float64 and got.prior.dtype == torch.float32
    assert len(np.unique(want_mask)) > 1  # a non-degenerate run: more than one class predicted
    return got


@pytest.mark.parametrize("steps", [None, 4, 1])
@pytest.mark.parametrize("which", ["binary", "fp"])
def test_pipeline_equals_reference_reverse_process(tiny, which, steps):
    pipe, seg, ref, fp = tiny
    refiner = ref if which == "binary" else fp
    _check_against_oracle(
        pipe, seg, refiner, pipe.config, which=which, steps=steps, seed=7, x=_images()
    )


@pytest.mark.parametrize("samples", [2, 3])
def test_pipeline_s_chains_equal_reference_chains(tiny, samples):
    pipe, seg, ref, _ = tiny
    got = _check_against_oracle(pipe, seg, ref, pipe.config, which="binary", steps=4, seed=5,
                                x=_images(), samples=samples)
    assert got.spread.shape == got.prob.shape and got.spread.max() > 0  # chains differ


@pytest.mark.parametrize("estimate", ["last", "trajectory"])
def test_pipeline_estimates_equal_the_reference_estimates(tiny, estimate):
    pipe, seg, ref, _ = tiny
    assert pipe.config.diffusion.sampling_estimate == "trajectory"  # the config's default
    got = _check_against_oracle(pipe, seg, ref, pipe.config, which="binary", steps=4, seed=5,
                                x=_images(), samples=2, estimate=estimate)
    other = pipe.predict(_images(), steps=4, seed=5, samples=2,
                         estimate="trajectory" if estimate == "last" else "last")
    assert not torch.equal(got.prob, other.prob)  # the choice reaches the loop
    with pytest.raises(ValueError, match="allowed: last, trajectory"):
        pipe.predict(_images(), steps=4, estimate="mean")


@pytest.mark.parametrize(
    "sampler,parameterization,num_classes",
    [("ancestral", "eps", 1), ("ddim", "y0", 1), ("ddim", "eps", 3)],
)
def test_pipeline_equals_reference_for_other_samplers_and_multiclass(
    sampler, parameterization, num_classes
):
    cfg = _config(sampler, parameterization, num_classes)
    seg, ref, _ = _build(cfg, seed=2)
    labels = {"background": 0, "a": 1} if num_classes == 1 else {"bg": 0, "a": 1, "b": 2}
    info = DatasetInfo(name="t", labels=labels, size=64)
    pipe = HiDiffPipeline(seg, ref, config=cfg, dataset_info=info)
    got = _check_against_oracle(
        pipe, seg, ref, cfg, which="binary", steps=5, seed=11, x=_images(seed=3)
    )
    assert got.mask.shape == (2, 64, 64) and int(got.mask.max()) < max(num_classes, 2)


def test_deterministic_for_a_seed_and_seeds_differ(tiny):
    pipe = tiny[0]
    x = _images()
    a = pipe.predict(x, seed=5, steps=3)
    b = pipe.predict(x, seed=5, steps=3)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.prob, b.prob)
    c = pipe.predict(x, seed=6, steps=3)
    assert not torch.equal(a.prob, c.prob)
    assert torch.equal(a.prior, c.prior)  # the segmentor does not depend on the seed


def test_steps_respacing_is_honoured(tiny):
    pipe, _, ref, _ = tiny
    told = []
    original = ref.forward_step

    def recording(cache, y_t, t):
        told.append(t.tolist())
        return original(cache, y_t, t)

    ref.forward_step = recording
    try:
        for steps, expected in [(3, reference.spaced_steps(10, 3)[::-1]), (None, range(10, 0, -1))]:
            told.clear()
            pipe.predict(_images(), steps=steps, seed=0)
            assert [t[0] for t in told] == list(expected)
            assert all(len(set(t)) == 1 and len(t) == 2 for t in told)
    finally:
        del ref.forward_step
    assert list(reference.spaced_steps(10, 3))[-1] == 10
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            pipe.predict(_images(), steps=bad)


def test_default_steps_come_from_the_config():
    cfg = _config()
    cfg = cfg.replace(diffusion=dataclasses.replace(cfg.diffusion, sampling_steps=2))
    assert make_scheduler(cfg).timesteps.tolist() == reference.spaced_steps(10, 2)[::-1]


def test_segmentor_alone(tiny):
    _, seg, ref, _ = tiny
    cfg = tiny[0].config
    x = _images()
    with torch.no_grad():
        prior = torch.sigmoid(seg(x).logits)
    alone = HiDiffPipeline(seg, None, config=cfg, dataset_info=INFO)
    for pipe, which in ((alone, None), (tiny[0], "none"), (tiny[0], None)):
        out = pipe.predict(x, refiner=which)
        torch.testing.assert_close(out.prior, prior, rtol=0, atol=0)
        assert torch.equal(out.prob, prior.double())
        assert torch.equal(out.mask, (prior[:, 0] > 0.5).to(torch.uint8))
    with pytest.raises(ValueError, match="no binary refiner"):
        alone.predict(x)


def test_bad_arguments(tiny):
    pipe = tiny[0]
    no_fp = HiDiffPipeline(tiny[1], tiny[2], config=pipe.config, dataset_info=INFO)
    with pytest.raises(ValueError, match="full-precision"):
        no_fp.predict(_images(), refiner="fp")
    with pytest.raises(ValueError, match="refiner must be one of"):
        pipe.predict(_images(), refiner="float")
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.predict(_images(size=60))
    with pytest.raises(ValueError, match="3 channels"):
        pipe.predict_image(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="image channels"):
        HiDiffPipeline(
            tiny[1],
            tiny[2],
            config=pipe.config,
            dataset_info=INFO.replace(channel_names=("G",), mean=(0.5,), std=(0.5,)),
        )


def _image(height, width, seed=0):
    return np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)


def test_resize_policy_predicts_at_config_size_and_restores_the_size(tiny):
    pipe = tiny[0]
    image = _image(90, 130)
    pred = pipe.predict_image(image, steps=3, seed=4)
    assert pred.mask.shape == (90, 130) and pred.mask.dtype == np.uint8
    assert pred.prob.shape == pred.prior.shape == (1, 90, 130)
    small = normalize(resize_planes(image, 64, 64), INFO.mean, INFO.std)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(small, -1, 0)))[None]
    mask = pipe.predict(x, steps=3, seed=4).mask[0].numpy()
    np.testing.assert_array_equal(pred.mask, resize_labels(mask, 90, 130))


@pytest.mark.parametrize("shape", [(150, 100), (40, 50)])
@pytest.mark.parametrize("which", ["binary", None])
def test_tile_policy_stitches_probabilities_over_a_non_multiple_image(tiny, shape, which):
    pipe0 = tiny[0]
    info = INFO.replace(policy="tile", tile=64, overlap=16)
    pipe = HiDiffPipeline(tiny[1], tiny[2], config=pipe0.config, dataset_info=info)
    image = _image(*shape, seed=3)
    pred = pipe.predict_image(image, steps=2, seed=9, refiner=which, tile_batch=100)
    assert pred.mask.shape == shape and pred.prob.shape == (1, *shape)

    tiles, starts = extract_tiles(normalize(image, info.mean, info.std), 64, 16)
    assert len(tiles) == (6 if shape == (150, 100) else 1)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(tiles, -1, 1)))
    out = pipe.predict(x, steps=2, seed=9, refiner=which)
    prob = stitch_tiles(out.prob.numpy(), starts, shape, channels_first=True)
    np.testing.assert_allclose(pred.prob, prob, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(pred.mask, reference.final_labels(prob[None])[0])
    if which is None:  # the stitched prior of the segmentor alone, thresholded
        np.testing.assert_array_equal(pred.mask, (pred.prior[0] > 0.5).astype(np.uint8))


@pytest.mark.parametrize("param", ["eps", "y0"])
def test_an_untrained_refiner_with_the_bayes_offset_reproduces_the_segmentor(param):
    """The zero-initialised head and the bayes offset: HiDiff at one step returns the
    segmentor's mask (up to pixels whose prior lies within abar_T + 2e-6 of 1/2), for any
    number of chains; the plain form (offset none) returns 1/2 everywhere instead."""
    cfg = _config(parameterization=param)
    assert cfg.refiner.offset == "bayes"  # the default of new models
    torch.manual_seed(0)
    seg = UNetSegmentor(cfg.segmentor)
    torch.nn.init.normal_(seg.head.weight, std=0.3)
    kw = dict(num_classes=1, image_channels=3, feature_channels=seg.feature_channels,
              feature_strides=seg.feature_strides)
    ref = BinaryRefiner(cfg.refiner, **kw)  # untrained: head weights and bias are zero
    pipe = HiDiffPipeline(seg.eval(), ref.eval(), config=cfg, dataset_info=INFO)
    x = _images(3)
    alone = pipe.predict(x, refiner=None)
    abar_t = reference.make_schedule("cosine", 10).alphas_cumprod[-1]
    clear = (np.abs(alone.prior.numpy()[:, 0] - 0.5) > abar_t + 2e-6)
    assert 0.05 < alone.mask.numpy().mean() < 0.95
    for samples in (1, 3):
        out = pipe.predict(x, steps=1, samples=samples, seed=2)
        np.testing.assert_array_equal(out.mask.numpy()[clear], alone.mask.numpy()[clear])
    plain = dataclasses.replace(cfg.refiner, offset="none")
    pipe_plain = HiDiffPipeline(seg, BinaryRefiner(plain, **kw).eval(),
                                config=cfg.replace(refiner=plain), dataset_info=INFO)
    # y0: the output 1/2 itself; eps: |y_T - 1/2| = 1/2 for binary y_T
    np.testing.assert_array_equal(pipe_plain.predict(x, steps=1).prob.numpy(), 0.5)
