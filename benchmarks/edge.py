"""Edge runtime benchmark: binary layers, one refiner step and the whole pipeline, per engine.

Same inputs for every engine, one thread, batch 1, a ``cpu-base`` model (256 x 256; random
weights, built with hidiff + export and cached, unless ``--model EXPORT [--model-dir DIR]``).
Engines are timed round-robin (one run of each per round: the same machine load); minimum and
median ms. Measured: each binary conv shape of the refiner (native packed kernel vs onnxruntime
float ``Conv``); one refiner step and the pipeline (segmentor + all steps) for torch eager,
onnxruntime on the stock files (fp twin; binary through the function bodies), the edge
``onnxruntime`` and ``packed`` backends; peak RSS of each engine in its own subprocess; bytes
read from disk; mask agreement.

    python benchmarks/edge.py [--quick] [--json PATH] [--model EXPORT --model-dir DIR]

``--quick`` (< 60 s): ``cpu-small`` (128 x 128), few runs, no torch, JSON only. The full run
writes ``benchmarks/results/edge.md`` and ``edge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import edge_report as report  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


# -- model --------------------------------------------------------------------------------------
def build_model(preset_name: str, cache: Path) -> tuple[Path, Path]:
    """A random ``preset_name`` model folder and its export, cached under ``cache``."""
    model_dir, export_dir = cache / "model", cache / "export"
    if (export_dir / "manifest.json").is_file() and (model_dir / "checkpoint.pt").is_file():
        return model_dir, export_dir
    # the tests' random-model builder (tests/edge/conftest.py, which imports tests/model_factory)
    sys.path[:0] = [str(ROOT / "tests" / "edge"), str(ROOT / "tests")]
    import torch
    from conftest import make_model_dir  # the tests' random-model builder

    from export import ExportError, export_model_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for seed in range(5):
            # export's torch-vs-export-ready check can fail on a random deep binary model
            # (an activation within rounding of 0 flips): try another seed
            make_model_dir(model_dir, preset_name=preset_name, seed=seed)
            try:
                export_model_dir(model_dir, export_dir)
                return model_dir, export_dir
            except ExportError as err:
                print(f"export with seed {seed} failed ({err}); next seed", file=sys.stderr)
        raise RuntimeError("could not export a random model")
    finally:
        torch.set_num_threads(threads)


# -- timing -------------------------------------------------------------------------------------
def round_robin(fns: dict, runs: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}


def ort_float_conv(spec: dict, shape: tuple) -> object:
    """A one-node float32 ``Conv`` session with the layer's +-1 weights and geometry."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.ortutil import make_session

    (ph, pw), io = spec["padding"], helper.make_tensor_value_info
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[ph, pw, ph, pw],
                            strides=list(spec["stride"]), dilations=list(spec["dilation"]))
    graph = helper.make_graph([node], "conv", [io("x", TensorProto.FLOAT, list(shape))],
                              [io("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(spec["weight"].astype(np.float32), "w")])
    return make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                          ir_version=10), 1)


def binary_layers(export: Path, feeds: dict) -> list:
    """``(name, input shape, spec with float weights)`` of every packed conv of the refiner."""
    import onnx

    from edge_runtime.executor import StepExecutor
    from edge_runtime.graph import split_refiner

    proto = onnx.load(str(export / "refiner_step.onnx"))
    return StepExecutor(proto, split_refiner(proto), keep_specs=True).binary_layers(feeds)


def bench_layers(layers: list, runs: int) -> list[dict]:
    """Each distinct binary conv of the refiner: packed kernel vs ORT float Conv."""
    from edge_runtime import packed

    rows, seen = [], {}
    for name, shape, spec in layers:
        spec = dict(spec)
        spec.pop("explicit_pads", None)
        weight = spec.pop("weight")
        key = (shape, weight.shape, spec["stride"], spec["padding"], spec["dilation"])
        short = name.replace("/refiner/", "").replace("/conv/BinaryConv", "")
        if key in seen or shape[1] < 0:
            if key in seen:
                seen[key]["layers"].append(short)
            continue
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        layer = packed.PackedBinaryConv(weight, threads=1, **spec)
        words = packed.pack_nchw(x)
        out = np.empty(layer.output_shape(shape[0], shape[2], shape[3]), np.float32)
        conv = ort_float_conv({"weight": weight, **spec}, shape)
        t = round_robin({
            "packed": lambda layer=layer, words=words, out=out: layer(words, out=out),
            "pack+packed": lambda layer=layer, x=x, out=out: layer(packed.pack_nchw(x), out=out),
            "ort": lambda conv=conv, x=x: conv.run(None, {"x": x}),
        }, runs)
        rows.append({
            "layers": [short], "input_nchw": list(shape), "out_channels": layer.out_channels,
            "kernel": list(layer.kernel_size), "stride": list(layer.stride),
            "packed_ms": t["packed"]["min_ms"], "pack_and_packed_ms": t["pack+packed"]["min_ms"],
            "ort_float_conv_ms": t["ort"]["min_ms"],
            "speedup": t["ort"]["min_ms"] / t["packed"]["min_ms"],
        })
        seen[key] = rows[-1]
    return rows


# -- engines ------------------------------------------------------------------------------------
class Engine:
    """``step()`` runs one refiner step (T, same y_t), ``pipeline()`` segmentor + all steps."""

    def __init__(self, name: str, step, pipeline, files: list[Path]) -> None:
        self.name, self.step, self.pipeline, self.files = name, step, pipeline, files


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


def _stock_ort_engine(export_dir: Path, role: str, x: np.ndarray, seed: int) -> Engine:
    """The exported files as they are: the whole refiner graph at every step."""
    import reference
    from edge_runtime.model import load_model
    from edge_runtime.ortutil import make_session

    facts = load_model(export_dir, roles=(role,), verify_hashes=False).facts
    seg = make_session(export_dir / "segmentor.onnx")
    ref = make_session(export_dir / f"{role}.onnx")
    names = [o.name for o in seg.get_outputs()]
    inputs = [i.name for i in ref.get_inputs()]
    outs = dict(zip(names, seg.run(None, {"image": x}), strict=True))
    y = (np.random.default_rng(seed).random(outs["prior"].shape) < outs["prior"]).astype(
        np.float32)
    kept = sorted(facts.timesteps)
    schedule = reference.respace(reference.make_schedule(facts.schedule, facts.num_steps), kept)

    def run(values, y_t, step):
        feeds = dict(values, image=x, y_t=y_t.astype(np.float32),
                     step=np.full(x.shape[0], step, np.int64))
        return ref.run(None, {n: feeds[n] for n in inputs})[0]

    def pipeline():
        values = dict(zip(names, seg.run(None, {"image": x}), strict=True))
        u = reference.draw_uniforms(seed, values["prior"].shape, len(kept))
        return reference.reverse_process(
            values["prior"], lambda y_t, s: run(values, y_t, s), schedule=schedule,
            uniforms=u, method=facts.sampler, parameterization=facts.parameterization,
            offset=facts.offset).y0_hat

    label = "fp twin" if role.endswith("_fp") else "binary, function bodies"
    return Engine(f"ORT stock ({label})", lambda: run(outs, y, facts.num_steps), pipeline,
                  [export_dir / "segmentor.onnx", export_dir / f"{role}.onnx"])


def _edge_engine(export_dir: Path, backend: str, refiner: str, x: np.ndarray,
                 seed: int) -> Engine:
    from edge_runtime import HiDiffSession

    session = HiDiffSession(export_dir, backend=backend, refiner=refiner, threads=1)
    seg = session.segment(x)
    prepared = session.refiner.prepare({"image": x, **seg})
    y = (np.random.default_rng(seed).random(seg["prior"].shape) < seg["prior"]).astype(
        np.float32)
    t_max = session.facts.num_steps
    role = "refiner_step_fp" if refiner == "fp" else "refiner_step"
    engine = Engine(f"edge {backend} ({refiner})", lambda: session.refiner(prepared, y, t_max),
                    lambda: session.predict_batch(x, seed=seed),
                    [export_dir / "segmentor.onnx", export_dir / f"{role}.onnx"])
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
}
QUICK = ("ort_stock_fp", "edge_ort_fp", "edge_ort_binary", "edge_packed")
QUICK_RSS = ("edge_ort_binary", "edge_packed")


def _input(export: Path, seed: int) -> np.ndarray:
    """A real Kvasir-SEG image (else a seeded random one) preprocessed for the model."""
    from PIL import Image

    from edge_runtime.model import load_model
    from reference import images as rimages

    facts = load_model(export, roles=("segmentor",), verify_hashes=False).facts
    h, w = facts.input_size
    data = Path(os.environ.get("HIDIFF_DATA", ROOT.parent / "shared" / "data"))
    files = sorted((data / "Kvasir-SEG" / "images").glob("*.jpg"))
    if files:
        with Image.open(files[0]) as im:
            image = np.asarray(im.convert("RGB"))
    else:
        image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = image.astype(np.float32) / np.float32(255)
    small = rimages.normalize(rimages.resize_planes(image, h, w), facts.mean, facts.std)
    return np.ascontiguousarray(np.moveaxis(small, -1, 0))[None]


def rss_child(args) -> int:
    """``--_rss ENGINE``: build one engine, run the pipeline once, print peak RSS."""
    args.x = _input(args.export, args.seed)
    if args._rss != "baseline":
        ENGINES[args._rss](args).pipeline()
    # ru_maxrss survives execve (it would report the parent's peak); VmHWM is this image's
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024.0
    print(json.dumps({"engine": args._rss, "peak_rss_mib": peak}))
    return 0


def measure_rss(args, names) -> dict[str, float]:
    out = {}
    for name in ("baseline", *names):
        cmd = [sys.executable, __file__, "--_rss", name, "--model", str(args.export),
               "--model-dir", str(args.model_dir), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child {name} failed:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return out


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cpu-small, few runs, JSON only")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--model", dest="export", type=Path, default=None,
                        help="exported folder (default: build a random one, cached)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the hidiff model folder of --model (for the torch engines)")
    parser.add_argument("--preset", default=None, help="preset to build (cpu-base; quick: "
                                                       "cpu-small)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_rss", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args._rss:
        return rss_child(args)
    import onnxruntime

    from edge_runtime import packed as kernel

    started, load_start = time.perf_counter(), os.getloadavg()
    preset_name = args.preset or ("cpu-small" if args.quick else "cpu-base")
    if args.export is None:
        cache = Path(tempfile.gettempdir()) / f"hidiff-bench-{preset_name}"
        args.model_dir, args.export = build_model(preset_name, cache)
    runs = args.runs or (3 if args.quick else 25)
    pipeline_runs = 1 if args.quick else 5
    args.x = _input(args.export, args.seed)
    names = [n for n in ENGINES if (n in QUICK if args.quick else
                                    args.model_dir is not None or not n.startswith("torch"))]
    real = {name: ENGINES[name](args) for name in names}
    for e in real.values():
        e.x = args.x
    packed = real["edge_packed"]
    weights = binary_layers(args.export, packed.feeds)
    layers = bench_layers(weights, runs)
    step = round_robin({k: e.step for k, e in real.items()}, runs)
    pipeline = round_robin({k: e.pipeline for k, e in real.items()}, pipeline_runs)
    seeds = (0, 1) if args.quick else (0, 1, 2, 3)
    agree = report.agreement({**real, "_model_dir": args.model_dir}, seeds)
    rss = measure_rss(args, QUICK_RSS if args.quick else names)
    chaos = None if args.quick or args.model_dir is None else report.torch_sensitivity(
        args.model_dir, args.x, args.seed)
    plan, facts = packed.session.refiner.executor.stats, packed.session.facts
    float_bytes = sum(spec["weight"].size * 4 for _, _, spec in weights)
    packed_bytes = sum(w.shape[0] * w.shape[2] * w.shape[3] * ((w.shape[1] + 31) // 32) * 4
                       for w in (spec["weight"] for _, _, spec in weights))
    ratios = {f"{kind}: {label} / edge packed": table[key]["min_ms"] / table["edge_packed"][
        "min_ms"] for kind, table in (("step", step), ("pipeline", pipeline))
        for label, key in report.RATIO_BASES if key in table}
    breakdown = report.step_breakdown(packed)
    if "ort_stock_fp" in step:  # what the real-valued layers alone allow
        ratios["step bound if binary convs + NumPy ops were free: ORT stock fp / packed ORT "
               "part"] = step["ort_stock_fp"]["min_ms"] / breakdown["ort"]
    result = {
        "machine": {"cpu": report.cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                    "kernel_path": kernel.current_path(),
                    "kernel_paths": list(kernel.available_paths())},
        "model": {"preset": preset_name, "input_size": list(facts.input_size),
                  "sampling_steps": facts.sampling_steps, "export": str(args.export)},
        "quick": args.quick, "runs": runs, "pipeline_runs": pipeline_runs,
        "load_average_start_end": [load_start, os.getloadavg()],
        "layers": layers, "step": step, "pipeline": pipeline,
        "engine_labels": {k: e.name for k, e in real.items()},
        "rss_mib": rss, "disk_bytes": {k: sum(f.stat().st_size for f in e.files)
                                       for k, e in real.items()},
        "binary_conv_weights": {"float_bytes_in_file": float_bytes,
                                "packed_bytes_in_memory": packed_bytes},
        "plan": {"packed": plan.packed, "chained": plan.packed_chained, "fused": plan.fused,
                 "emit_next_words": plan.packed_words, "numpy": plan.numpy,
                 "ort": plan.ort, "ort_sessions": plan.ort_sessions,
                 "fallbacks": plan.fallbacks},
        "packed_step_breakdown_ms": breakdown, "ratios": ratios, "agreement": agree,
        "torch_sensitivity_1ulp": chaos,
        "notes": report.NOTES.format(float_mb=float_bytes / 2**20,
                                     packed_kb=packed_bytes / 1024,
                                     ort_sessions=plan.ort_sessions),
        "wall_s": time.perf_counter() - started,
    }
    text = json.dumps(result, indent=1, default=float) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "edge.json").write_text(text)
        report.write_markdown(result, RESULTS / "edge.md")
    print(json.dumps({"ratios": ratios, "wall_s": round(result["wall_s"], 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
