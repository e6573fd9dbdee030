"""The engines ``benchmarks/edge.py`` times, each on the same preprocessed image.

An engine has ``step()``: one refiner step at batch 1 (step T, the same y_t), and ``image()``:
one image at the model's default sampling (segmentor once, then steps x S chains, the S chains
one batch): what a user waits for per image. The stock-ORT engines run the exported files as
they are (the whole refiner graph at every step) through :func:`reference.predict_batch`, the
same loop the edge backends run, so every engine does the same sampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ENGINES", "QUICK", "QUICK_RSS", "Engine"]


class Engine:
    """``step()`` one refiner step (T, same y_t); ``image()`` one image at the default sampling."""

    def __init__(self, name: str, step, image, files: list[Path]) -> None:
        self.name, self.step, self.image, self.files = name, step, image, files


def _torch_engine(model_dir: Path, refiner: str, x: np.ndarray, seed: int) -> Engine:
    import torch

    from hidiff.evaluation import pipeline_from_model_dir
    from hidiff.segmentor import prior_from_logits

    torch.set_num_threads(1)
    pipe = pipeline_from_model_dir(model_dir)[1]
    module = pipe.refiner_module(refiner)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        seg = pipe.segmentor(xt)
        prior = prior_from_logits(seg.logits)
        cache = module.precompute(xt, prior, tuple(seg.features))
        y = (torch.from_numpy(np.random.default_rng(seed).random(prior.shape)) < prior).float()
    t_max = torch.full((x.shape[0],), pipe.config.diffusion.num_steps, dtype=torch.long)

    def step():
        with torch.no_grad():
            return torch.sigmoid(module.forward_step(cache, y, t_max))

    return Engine(f"torch eager ({refiner})", step,
                  lambda: pipe.predict(xt, seed=seed, refiner=refiner),
                  [model_dir / "checkpoint.pt"])


def _stock_ort_engine(export_dir: Path, role: str, x: np.ndarray, seed: int,
                      threads: int = 1) -> Engine:
    """The exported files as they are: the whole refiner graph at every step."""
    import reference
    from edge_runtime.model import load_model
    from edge_runtime.ortutil import make_session

    facts = load_model(export_dir, roles=(role,), verify_hashes=False).facts
    seg = make_session(export_dir / "segmentor.onnx", threads)
    ref = make_session(export_dir / f"{role}.onnx", threads)
    names = [o.name for o in seg.get_outputs()]
    inputs = [i.name for i in ref.get_inputs()]
    outs = dict(zip(names, seg.run(None, {"image": x}), strict=True), image=x)
    y = (np.random.default_rng(seed).random(outs["prior"].shape) < outs["prior"]).astype(
        np.float32)
    schedule = reference.respace(reference.make_schedule(facts.schedule, facts.num_steps),
                                 sorted(facts.timesteps))
    sampler = reference.Sampler(schedule, method=facts.sampler,
                                parameterization=facts.parameterization, offset=facts.offset,
                                samples=facts.sampling_samples,
                                estimate=facts.sampling_estimate)

    def run(values, y_t, step):
        feeds = dict(values, y_t=y_t.astype(np.float32),
                     step=np.full(y_t.shape[0], step, np.int64))
        return ref.run(None, {n: feeds[n] for n in inputs})[0]

    def segment(part):
        values = dict(zip(names, seg.run(None, {"image": part}), strict=True), image=part)
        chains = {k: np.concatenate([v] * sampler.samples) for k, v in values.items()}
        return values["prior"], chains

    def image():
        return reference.predict_batch(x, segment=segment, denoise=run, sampler=sampler,
                                       seed=seed)

    label = "fp twin" if role.endswith("_fp") else "binary, function bodies"
    suffix = f", {threads} threads" if threads > 1 else ""
    return Engine(f"ORT stock ({label}{suffix})", lambda: run(outs, y, facts.num_steps), image,
                  [export_dir / "segmentor.onnx", export_dir / f"{role}.onnx"])


def _edge_engine(export_dir: Path, backend: str, refiner: str, x: np.ndarray, seed: int,
                 threads: int = 1, segmentor: str = "fp32", rewrite: bool = True,
                 refiner_static: str = "fp32") -> Engine:
    from edge_runtime import HiDiffSession
    from edge_runtime.model import load_model
    from edge_runtime.refiner import RefinerRunner

    session = HiDiffSession(export_dir, backend=backend, refiner=refiner, threads=threads,
                            segmentor=segmentor, refiner_static=refiner_static)
    role = "refiner_step_fp" if refiner == "fp" else "refiner_step"
    if not rewrite:  # the refiner step as exported, without edge_runtime.rewrite
        session.refiner = RefinerRunner(load_model(export_dir, roles=("segmentor", role))
                                        .protos[role], backend=backend, threads=threads,
                                        rewrite=False)
    seg = session.segment(x)
    prepared = session.refiner.prepare({"image": x, **seg})
    y = (np.random.default_rng(seed).random(seg["prior"].shape) < seg["prior"]).astype(
        np.float32)
    t_max = session.facts.num_steps
    extra = "".join([f", {threads} threads" if threads > 1 else "",
                     ", int8 segmentor" if segmentor == "int8" else "",
                     ", int8 refiner static part" if refiner_static == "int8" else "",
                     ", graph as exported" if not rewrite else ""])
    files = [export_dir / ("segmentor_int8.onnx" if segmentor == "int8" else "segmentor.onnx"),
             export_dir / f"{role}.onnx"]
    if refiner_static == "int8":
        files.append(export_dir / "refiner_static_int8.onnx")
    engine = Engine(f"edge {backend} ({refiner}{extra})",
                    lambda: session.refiner(prepared, y, t_max),
                    lambda: session.predict_batch(x, seed=seed), files)
    engine.session = session
    engine.feeds = session.refiner.feeds(prepared, y, t_max)
    return engine


ENGINES = {
    "torch_binary": lambda a: _torch_engine(a.model_dir, "binary", a.x, a.seed),
    "torch_fp": lambda a: _torch_engine(a.model_dir, "fp", a.x, a.seed),
    "ort_stock_fp": lambda a: _stock_ort_engine(a.export, "refiner_step_fp", a.x, a.seed),
    "ort_stock_binary": lambda a: _stock_ort_engine(a.export, "refiner_step", a.x, a.seed),
    "edge_ort_fp": lambda a: _edge_engine(a.export, "onnxruntime", "fp", a.x, a.seed),
    "edge_ort_binary": lambda a: _edge_engine(a.export, "onnxruntime", "binary", a.x, a.seed),
    "edge_packed": lambda a: _edge_engine(a.export, "packed", "binary", a.x, a.seed),
    "edge_packed_asis": lambda a: _edge_engine(a.export, "packed", "binary", a.x, a.seed,
                                               rewrite=False),
    "edge_packed_int8": lambda a: _edge_engine(a.int8_export, "packed", "binary", a.x, a.seed,
                                               segmentor="int8"),
    "edge_packed_int8_static": lambda a: _edge_engine(a.int8_export, "packed", "binary", a.x,
                                                      a.seed, refiner_static="int8"),
    "edge_packed_int8_all": lambda a: _edge_engine(a.int8_export, "packed", "binary", a.x,
                                                   a.seed, segmentor="int8",
                                                   refiner_static="int8"),
    "ort_stock_fp_2t": lambda a: _stock_ort_engine(a.export, "refiner_step_fp", a.x, a.seed,
                                                   threads=2),
    "edge_packed_2t": lambda a: _edge_engine(a.export, "packed", "binary", a.x, a.seed,
                                             threads=2),
}
#: engines that need something the run may not have
NEEDS = {"torch_binary": "model_dir", "torch_fp": "model_dir", "edge_packed_int8": "int8_export",
         "edge_packed_int8_static": "int8_export", "edge_packed_int8_all": "int8_export",
         "ort_stock_fp_2t": "two_cpus", "edge_packed_2t": "two_cpus"}
QUICK = ("ort_stock_fp", "edge_ort_fp", "edge_ort_binary", "edge_packed", "edge_packed_asis",
         "edge_packed_int8", "edge_packed_int8_all")
QUICK_RSS = ("edge_ort_binary", "edge_packed")
