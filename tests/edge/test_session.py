"""End to end on real Kvasir-SEG images: edge ``packed`` == edge ``onnxruntime`` == torch.

The three pipelines draw the same uniforms (``reference.draw_uniforms``) and differ only where
their network outputs differ. The packed backend computes the binary layers with the native
kernel and keeps ORT for the rest of the graph, so its outputs equal the ORT backend's bit for
bit: asserted at every step.

Torch and ORT round differently (MLAS vs oneDNN), by ~1e-6 on the outputs, and where an
activation of the binary refiner lies within that rounding of 0 it binarizes the other way, which
moves the outputs near it by more. So against torch the check is along the trajectory, sample by
sample: torch must have drawn exactly ``u < mean_torch`` with the edge's uniforms at the same
positions (same tile order, same uniform layout), so the samples of an image (tile) stay
identical until a draw where the two networks' means, computed on identical states, lie on both
sides of the uniform (a *near-threshold event*); from there the binary refiner may amplify the
flip inside that image. Mask pixels then differ inside images (tiles) that diverged so, and
also in images that did not, where such a rounding flip inside the refiner moves a final
``y0_hat`` across 0.5 (measured: up to ~0.05 from 0.5). What is asserted: the trajectory rule
above exactly, and mask agreement above ``MIN_AGREEMENT``; the counts of each kind are printed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reference
from edge_runtime import EdgeError, HiDiffSession
from reference import images as rimages

PROB_ATOL = 1e-4
MIN_AGREEMENT = 0.98
SEED = 1234

pytestmark = pytest.mark.data


def _kvasir(root: Path, count: int, offset: int = 0) -> list[np.ndarray]:
    files = sorted((root / "images").glob("*.jpg"))[offset:offset + count]
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _torch_trajectory(pipe, x: np.ndarray, steps, seed: int, refiner: str = "binary"):
    """Torch's prior, samples, step means and final estimate (its own modules and the
    diffusers-shaped scheduler; checked equal to ``pipe.predict``): the last y0_hat, or the mean
    of every step's for the config's ``sampling_estimate`` ``trajectory``."""
    import torch

    from hidiff.pipeline import make_scheduler
    from hidiff.segmentor import prior_from_logits

    module, sched = pipe.refiner_module(refiner), make_scheduler(pipe.config, steps)
    n = len(sched.timesteps)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        seg = pipe.segmentor(xt)
        prior = prior_from_logits(seg.logits)
        u = torch.from_numpy(reference.draw_uniforms(seed, tuple(prior.shape), n))
        cache = module.precompute(xt, prior, tuple(seg.features))
        prior64 = prior.double()
        y = sched.initial_sample(prior64, u[0])
        states, means, total = [y.numpy()], [], 0.0
        for k, step in enumerate(sched.timesteps.tolist()):
            t = torch.full((x.shape[0],), step, dtype=torch.long)
            out = torch.sigmoid(module.forward_step(cache, y.float(), t))
            res = sched.step(out.double(), step, y, prior=prior64,
                             u=u[k + 1] if k + 1 < n else None)
            y = res.prev_sample
            total = total + res.pred_original_sample.numpy()
            if res.prev_mean is not None:
                states.append(y.numpy())
                means.append(res.prev_mean.numpy())
    y0 = res.pred_original_sample.numpy()
    if pipe.config.diffusion.sampling_estimate == "trajectory":
        y0 = total / n
    expected = pipe.predict(xt, steps=steps, samples=1, seed=seed, refiner=refiner).mask.numpy()
    assert np.array_equal((y0[:, 0] > 0.5).astype(np.uint8), expected)
    return prior64.numpy(), states, means, y0


def _compare_with_torch(session, x: np.ndarray, pipe, steps, seed: int):
    """Per image (tile): did its trajectory diverge from torch's? Asserts the module
    docstring's conditions; returns the flags and the counts for the report. One chain (S = 1):
    S chains: test_s_chains_packed_ort_torch."""
    trace: list = []
    res = session.predict_batch(x, steps=steps, samples=1, seed=seed, trace=trace)
    y0_e, prior_e = res.prob, res.prior
    prior_t, states_t, means_t, y0_t = _torch_trajectory(pipe, x, steps, seed,
                                                         session.refiner_name)
    uniforms = reference.draw_uniforms(seed, prior_e.shape, len(trace))
    # torch sampled with exactly these uniforms at exactly these positions
    assert np.array_equal(states_t[0], (uniforms[0] < prior_t).astype(np.float64))
    for k, mean in enumerate(means_t):
        assert np.array_equal(states_t[k + 1], (uniforms[k + 1] < mean).astype(np.float64))
    states_e = [y[0] for _, y, _, _ in trace]  # chain 0 of S = 1
    means_e = [prior_e.astype(np.float64)] + [m[0] for _, _, _, m in trace[:-1]]
    means_t = [prior_t, *means_t]
    n = x.shape[0]
    diverged = np.zeros(n, dtype=bool)
    flips, disagreement, off = 0, 0.0, 0
    for k in range(len(states_e)):
        same = ~diverged[:, None, None, None] & np.ones_like(states_e[k], dtype=bool)
        gap = np.abs(means_e[k] - means_t[k])[same]
        disagreement = max(disagreement, float(gap.max(initial=0.0)))
        off += int((gap > PROB_ATOL).sum())
        diff = (states_e[k] != states_t[k]) & same
        if diff.any():
            straddle = (uniforms[k] < means_e[k]) != (uniforms[k] < means_t[k])
            assert np.all(straddle[diff])  # implied by the asserts above; kept explicit
            flips += int(diff.sum())
            diverged |= diff.reshape(n, -1).any(axis=1)
    mismatch = (y0_e > 0.5) != (y0_t > 0.5)
    final = mismatch & ~diverged[:, None, None, None]
    report = {"images": n, "diverged": int(diverged.sum()), "flipped_draws": flips,
              "max_mean_disagreement": disagreement, f"means_off_by_>{PROB_ATOL}": off,
              "mask_mismatch": int(mismatch.sum()), "of": int(mismatch.size),
              "mismatch_in_non_diverged": int(final.sum())}
    return diverged, report


@pytest.fixture(scope="module")
def sessions(tiny_export):
    _, out = tiny_export
    return {b: HiDiffSession(out, backend=b) for b in ("packed", "onnxruntime")}


@pytest.fixture(scope="module")
def torch_pipe(tiny_export):
    from hidiff.evaluation import pipeline_from_model_dir

    return pipeline_from_model_dir(tiny_export[0])[1]


@pytest.mark.parametrize("steps", [None, 4, 10])
def test_batch_masks_packed_ort_torch(sessions, torch_pipe, kvasir_root, steps):
    """Three real images at the model's size: backends bit-identical, torch along the
    trajectory (module docstring)."""
    s = sessions["packed"]
    h, w = s.facts.input_size
    x = np.stack([np.moveaxis(rimages.normalize(rimages.resize_planes(im / np.float32(255), h, w),
                                               s.facts.mean, s.facts.std), -1, 0)
                  for im in _kvasir(kvasir_root, 3)]).astype(np.float32)
    results, traces = {}, {}
    for name, sess in sessions.items():
        traces[name] = []
        results[name] = sess.predict_batch(x, steps=steps, seed=SEED, trace=traces[name])
    prob_p, prob_o = results["packed"].prob, results["onnxruntime"].prob
    mask_p, mask_o = reference.final_labels(prob_p), reference.final_labels(prob_o)
    assert np.array_equal(prob_p, prob_o) and np.array_equal(mask_p, mask_o)
    for (_, _, out_p, _), (_, _, out_o, _) in zip(traces["packed"], traces["onnxruntime"],
                                                  strict=True):
        assert np.array_equal(out_p, out_o)  # every step's network output, bit for bit
    assert 0 < mask_o.mean() < 1
    _, report = _compare_with_torch(sessions["onnxruntime"], x, torch_pipe, steps, SEED)
    print(f"steps={steps}: torch vs edge {report}")
    assert report["mask_mismatch"] <= (1 - MIN_AGREEMENT) * report["of"]


def test_whole_images_match_torch(sessions, torch_pipe, kvasir_root):
    """``predict`` on full-size real images (resize there and back) equals the torch
    pipeline's ``predict_image`` for the same seed, for both backends."""
    for image in _kvasir(kvasir_root, 2, offset=3):
        ref = torch_pipe.predict_image(image.astype(np.float32) / np.float32(255), seed=7)
        for sess in sessions.values():
            pred = sess.predict(image, seed=7)
            assert pred.mask.shape == image.shape[:2] and pred.mask.dtype == np.uint8
            assert pred.prob.shape == (1, *image.shape[:2])
            assert int((pred.mask != ref.mask).sum()) == 0
            np.testing.assert_allclose(pred.prior, ref.prior, atol=1e-5)
        # uint8 and float input give the same result
        as_float = sessions["packed"].predict(image.astype(np.float32) / np.float32(255), seed=7)
        assert np.array_equal(as_float.mask, pred.mask)


def test_tile_policy_matches_torch(tiny_tile_export, kvasir_root):
    """Tile policy: the same tiles in the same order with the same uniforms as the torch
    pipeline; tiles whose trajectories never diverge give identical pixels."""
    from hidiff.evaluation import pipeline_from_model_dir

    model_dir, out = tiny_tile_export
    pipe = pipeline_from_model_dir(model_dir)[1]
    image = _kvasir(kvasir_root, 1)[0][:150, :200]  # 3 x 4 tiles of 64 px, overlap 16
    ref = pipe.predict_image(image.astype(np.float32) / np.float32(255), seed=3, tile_batch=5)
    packed = HiDiffSession(out, backend="packed", tile_batch=5)
    pred = packed.predict(image, seed=3)
    other = HiDiffSession(out, backend="onnxruntime", tile_batch=3).predict(image, seed=3)
    assert np.array_equal(pred.prob, other.prob) and np.array_equal(pred.mask, other.mask)
    assert pred.mask.shape == (150, 200)

    facts = packed.facts
    tiles, starts = rimages.extract_tiles(
        rimages.normalize(image / np.float32(255), facts.mean, facts.std), facts.tile,
        facts.overlap)
    x = np.ascontiguousarray(np.moveaxis(tiles, -1, 1), dtype=np.float32)
    diverged, report = _compare_with_torch(packed, x, pipe, None, 3)
    covered = np.zeros(image.shape[:2], dtype=bool)
    for bad, (y, x0) in zip(diverged, starts, strict=True):
        if bad:
            covered[y:y + facts.tile, x0:x0 + facts.tile] = True
    straddle = (pred.prob[0] > 0.5) != (ref.prob[0] > 0.5)
    differ = pred.mask != ref.mask
    print(f"tiles: {report}; stitched mask mismatch {int(differ.sum())} of {differ.size}, "
          f"{int(covered.sum())} pixels in diverged tiles")
    assert not (differ & ~covered & ~straddle).any()
    assert differ.sum() <= (1 - MIN_AGREEMENT) * differ.size
    small = image[:40, :50]  # smaller than one tile: zero padded bottom/right
    assert packed.predict(small, seed=3).mask.shape == (40, 50)


@pytest.mark.parametrize("backend", ["packed", "onnxruntime"])
def test_fp_twin_matches_torch(tiny_export, torch_pipe, kvasir_root, backend):
    """``refiner="fp"``: the full-precision twin (no binary layers: the packed backend runs it
    all in onnxruntime pieces)."""
    session = HiDiffSession(tiny_export[1], backend=backend, refiner="fp")
    h, w = session.facts.input_size
    x = np.stack([np.moveaxis(rimages.normalize(rimages.resize_planes(im / np.float32(255), h, w),
                                               session.facts.mean, session.facts.std), -1, 0)
                  for im in _kvasir(kvasir_root, 2, offset=5)]).astype(np.float32)
    diverged, report = _compare_with_torch(session, x, torch_pipe, 5, SEED)
    print(f"fp twin ({backend}): {report}")
    assert report["mask_mismatch"] <= (1 - MIN_AGREEMENT) * report["of"]
    if backend == "packed":
        assert session.refiner.executor.stats.packed == 0


def test_multiclass_matches_torch(tiny_k3_export, kvasir_root):
    """K = 3: softmax prior, per-channel Bernoulli draws, argmax mask, labels 0..2."""
    from hidiff.evaluation import pipeline_from_model_dir

    model_dir, out = tiny_k3_export
    pipe = pipeline_from_model_dir(model_dir)[1]
    image = _kvasir(kvasir_root, 1, offset=2)[0]
    ref = pipe.predict_image(image.astype(np.float32) / np.float32(255), seed=2)
    for backend in ("packed", "onnxruntime"):
        pred = HiDiffSession(out, backend=backend).predict(image, seed=2)
        assert pred.prob.shape == (3, *image.shape[:2]) and set(np.unique(pred.mask)) <= {0, 1, 2}
        mismatch = int((pred.mask != ref.mask).sum())
        print(f"K=3 {backend}: mask mismatch vs torch {mismatch} of {pred.mask.size}")
        assert mismatch <= (1 - MIN_AGREEMENT) * pred.mask.size


def test_seed_and_steps_change_the_result(sessions, kvasir_root):
    image = _kvasir(kvasir_root, 1)[0]
    s = sessions["packed"]
    a = s.predict(image, seed=0)
    assert np.array_equal(a.mask, s.predict(image, seed=0).mask)
    assert not np.array_equal(a.prob, s.predict(image, seed=1).prob)
    assert not np.array_equal(a.prob, s.predict(image, seed=0, steps=3).prob)


def test_bad_arguments(tiny_export):
    _, out = tiny_export
    with pytest.raises(EdgeError, match="backend"):
        HiDiffSession(out, backend="gpu")
    with pytest.raises(EdgeError, match="refiner"):
        HiDiffSession(out, refiner="half")
    s = HiDiffSession(out, backend="onnxruntime")
    with pytest.raises(EdgeError, match="steps"):
        s.predict(np.zeros((8, 8, 3), np.uint8), steps=11)
    with pytest.raises(EdgeError, match="grayscale"):
        s.predict(np.zeros((8, 8), np.uint8))
    with pytest.raises(EdgeError, match="16-bit"):
        s.predict(np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(EdgeError, match=r"\[0, 1\]"):
        s.predict(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(EdgeError, match="allowed: last, trajectory"):
        s.sampler(estimate="mean")


def test_sampling_estimate_comes_from_the_manifest_and_older_exports_read_last(sessions,
                                                                               tiny_export):
    from edge_runtime.errors import ModelError
    from edge_runtime.model import ModelFacts

    s = sessions["packed"]
    assert s.facts.sampling_estimate == "trajectory" == s.sampler().estimate
    assert s.sampler(estimate="last").estimate == "last"
    legacy = HiDiffSession(tiny_export[1], backend="onnxruntime")
    legacy.facts = dataclasses.replace(legacy.facts, sampling_estimate="last")
    assert legacy.sampler().estimate == "last"  # the default is the manifest's, not a constant
    x = np.random.default_rng(0).standard_normal(
        (1, s.facts.in_channels, *s.facts.input_size)).astype(np.float32)
    got = {e: s.predict_batch(x, steps=3, samples=2, seed=1, estimate=e, trace=(t := []))
           for e in ("last", "trajectory")}
    assert not np.array_equal(got["last"].prob, got["trajectory"].prob)  # the override reaches it
    assert np.array_equal(got["trajectory"].prob, legacy.predict_batch(
        x, steps=3, samples=2, seed=1, estimate="trajectory").prob)  # and wins over the default
    assert len(t) == 3
    raw = dict(s.facts.raw)
    del raw["sampling_estimate"]  # an export made before the choice existed
    assert ModelFacts.from_dict(raw, tiny_export[1]).sampling_estimate == "last"
    with pytest.raises(ModelError, match="allowed: last, trajectory"):
        ModelFacts.from_dict({**raw, "sampling_estimate": "median"}, tiny_export[1])


def test_s_chains_packed_ort_torch(sessions, torch_pipe, kvasir_root):
    """S = 3 chains per image: the backends agree bit for bit on the mean estimate and the spread;
    against torch (rounding flips inside the binary refiner, module docstring) the whole-image
    masks agree on at least MIN_AGREEMENT of the pixels."""
    s = sessions["packed"]
    h, w = s.facts.input_size
    x = np.stack([np.moveaxis(rimages.normalize(rimages.resize_planes(im / np.float32(255), h, w),
                                               s.facts.mean, s.facts.std), -1, 0)
                  for im in _kvasir(kvasir_root, 2)]).astype(np.float32)
    got = {name: sess.predict_batch(x, steps=3, samples=3, seed=SEED)
           for name, sess in sessions.items()}
    assert np.array_equal(got["packed"].prob, got["onnxruntime"].prob)
    assert np.array_equal(got["packed"].spread, got["onnxruntime"].spread)
    assert got["packed"].spread.max() > 0  # the chains differ
    image = _kvasir(kvasir_root, 1, offset=5)[0]
    ref = torch_pipe.predict_image(image.astype(np.float32) / np.float32(255), seed=3,
                                   samples=3)
    preds = {}
    for name, sess in sessions.items():
        pred = preds[name] = sess.predict(image, seed=3, samples=3)
        assert pred.spread.shape == ref.spread.shape == (1, *image.shape[:2])
        agreement = float((pred.mask == ref.mask).mean())
        print(f"{sess.backend}: S = 3 whole-image mask agreement with torch {agreement:.4f}")
        assert agreement >= MIN_AGREEMENT
    # one image: the packed backend keeps one copy of the per-image values its NumPy nodes
    # broadcast over the chains (RefinerRunner.batch_shared); the result stays bit-identical
    assert sessions["packed"].refiner.batch_shared
    # ... and receives the static maps its step reads only in NHWC from onnxruntime in NHWC
    runner = sessions["packed"].refiner
    assert runner.executor.nhwc_feeds
    prepared = runner.prepare({"image": x[:1], **sessions["packed"].segment(x[:1])})
    nchw = sessions["onnxruntime"].refiner.prepare({"image": x[:1],
                                                    **sessions["onnxruntime"].segment(x[:1])})
    for name in runner.executor.nhwc_feeds:
        assert np.array_equal(prepared[name], nchw[name].transpose(0, 2, 3, 1))
    assert np.array_equal(preds["packed"].prob, preds["onnxruntime"].prob)
    assert np.array_equal(preds["packed"].spread, preds["onnxruntime"].spread)


@pytest.mark.parametrize("chunk", [1, 2])
def test_packed_chunks_of_a_batch_change_no_bit(sessions, kvasir_root, monkeypatch, chunk):
    """The packed step runs a batch in chunks (edge_runtime.refiner.CHUNK_BYTES); the chains
    are independent, so any chunk size gives the same bits as one batch and as onnxruntime."""
    from edge_runtime import refiner

    s = sessions["packed"]
    h, w = s.facts.input_size
    x = np.stack([np.moveaxis(rimages.normalize(rimages.resize_planes(im / np.float32(255), h, w),
                                               s.facts.mean, s.facts.std), -1, 0)
                  for im in _kvasir(kvasir_root, 2)]).astype(np.float32)
    whole = s.predict_batch(x, steps=2, samples=3, seed=SEED)
    seg = s.segment(x[:1])
    feeds = s.refiner.feeds(s.refiner.prepare({"image": x[:1], **seg}),
                            np.zeros((1, *seg["prior"].shape[1:]), np.float32), 10)
    per_item = max(v.nbytes // v.shape[0] for v in feeds.values() if v.ndim == 4)
    monkeypatch.setattr(refiner, "CHUNK_BYTES", per_item * chunk)
    assert s.refiner.chunk_size(feeds, 6) == chunk
    got = s.predict_batch(x, steps=2, samples=3, seed=SEED)
    assert np.array_equal(got.prob, whole.prob) and np.array_equal(got.spread, whole.spread)
    ort = sessions["onnxruntime"].predict_batch(x, steps=2, samples=3, seed=SEED)
    assert np.array_equal(got.prob, ort.prob)
