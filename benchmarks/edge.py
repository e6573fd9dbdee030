"""Edge runtime benchmark: binary layers, one refiner step and one image, per engine.

Same inputs for every engine, batch 1, a ``cpu-base`` model (256 x 256; random weights, built
with hidiff + export and cached, unless ``--model EXPORT [--model-dir DIR]``). Engines are timed
round-robin (one run of each per round: the same machine load); minimum and median ms. The
process keeps freed memory for every engine (``reference.memory.keep_freed_memory``, as
``hidiff-edge predict`` does). Measured: each binary conv shape of the refiner (native packed
kernel vs onnxruntime float ``Conv``, 1 thread); one refiner step (batch 1) and one image at the
model's default sampling (segmentor once, steps x S chains, the S chains one batch) for torch
eager, onnxruntime on the stock files (fp twin; binary through the function bodies), the edge
``onnxruntime`` and ``packed`` backends, at 1 thread and (where the process may use 2 CPUs) the
fp twin and packed at 2 threads; the segmentor and the refiner's per-image (static) part fp32
vs int8 (``hidiff-edge quantize``, calibrated on training images) and the packed image with
either or both in int8; where the packed step's time goes (per executor and per onnxruntime
piece); peak RSS of each engine in its own subprocess; bytes read from disk; mask agreement
(also packed vs onnxruntime on the same int8 graphs). ``--dice-model EXPORT`` (a trained
Kvasir-SEG export) adds the int8 graphs' Dice change on the Kvasir-SEG test split.

    python benchmarks/edge.py [--quick] [--json PATH] [--model EXPORT --model-dir DIR]
                              [--dice-model EXPORT]

``--quick`` (< 90 s): ``cpu-small`` (128 x 128), few runs, no torch, JSON only. The full run
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
    """``(name, input shape, spec with float weights)`` of every packed conv of the refiner
    (built as the edge session builds it, so that ``feeds``, its runner's, fit)."""
    import onnx

    from edge_runtime.refiner import RefinerRunner

    runner = RefinerRunner(onnx.load(str(export / "refiner_step.onnx")), backend="packed",
                           keep_specs=True)
    return runner.executor.binary_layers(feeds)


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
        # the same conv writing sign bits (one compare per 16 outputs): its XOR / popcount loop
        # nearly alone, the kernel's throughput ceiling on this core
        bits = packed.PackedBinaryConv(weight, threads=1, **spec,
                                       thresholds=np.zeros(layer.out_channels, np.float32))
        words = packed.pack_nchw(x)
        out = np.empty(layer.output_shape(shape[0], shape[2], shape[3]), np.float32)
        conv = ort_float_conv({"weight": weight, **spec}, shape)
        t = round_robin({
            "packed": lambda layer=layer, words=words, out=out: layer(words, out=out),
            "bits": lambda bits=bits, words=words: bits.forward_packed(words),
            "pack+packed": lambda layer=layer, x=x, out=out: layer(packed.pack_nchw(x), out=out),
            "ort": lambda conv=conv, x=x: conv.run(None, {"x": x}),
        }, runs)
        _, ho, wo, cout = out.shape
        macs = ho * wo * cout * shape[1] * int(np.prod(layer.kernel_size))
        rows.append({
            "layers": [short], "input_nchw": list(shape), "out_channels": layer.out_channels,
            "kernel": list(layer.kernel_size), "stride": list(layer.stride), "macs": macs,
            "packed_ms": t["packed"]["min_ms"], "packed_bits_out_ms": t["bits"]["min_ms"],
            "pack_and_packed_ms": t["pack+packed"]["min_ms"],
            "ort_float_conv_ms": t["ort"]["min_ms"],
            "speedup": t["ort"]["min_ms"] / t["packed"]["min_ms"],
            "speedup_bits_out": t["ort"]["min_ms"] / t["bits"]["min_ms"],
        })
        seen[key] = rows[-1]
    return rows


from edge_engines import ENGINES, QUICK, QUICK_RSS  # noqa: E402


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


def _available(name: str, args) -> bool:
    from edge_engines import NEEDS

    from edge_runtime.session import usable_cpus

    need = NEEDS.get(name)
    if need == "two_cpus":
        return usable_cpus() >= 2
    return need is None or getattr(args, need, None) is not None


def rss_child(args) -> int:
    """``--_rss ENGINE``: build one engine, predict one image once, print peak RSS."""
    args.x = _input(args.export, args.seed)
    if args._rss != "baseline":
        ENGINES[args._rss](args).image()
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
        if args.int8_export is not None:
            cmd += ["--_int8", str(args.int8_export)]
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
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "HIDIFF_DATA", ROOT.parent / "shared" / "data")), help="datasets root (../shared/data)")
    parser.add_argument("--dice-model", type=Path, default=None, metavar="EXPORT",
                        help="a trained Kvasir-SEG export: also measure the int8 segmentor's "
                             "Dice change on the test split")
    parser.add_argument("--_rss", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_int8", dest="int8_export", type=Path, default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _ratios(step: dict, image: dict) -> dict[str, float]:
    """Every speed ratio the report states (higher: the packed binary refiner is faster)."""
    out = {}
    for kind, table in (("step", step), ("image", image)):
        for label, key in report.RATIO_BASES:
            if key in table:
                out[f"{kind}: {label} / edge packed"] = (table[key]["min_ms"]
                                                        / table["edge_packed"]["min_ms"])
        if "ort_stock_fp_2t" in table:
            out[f"{kind}, 2 threads: ORT stock fp twin / edge packed"] = (
                table["ort_stock_fp_2t"]["min_ms"] / table["edge_packed_2t"]["min_ms"])
            out[f"{kind}: edge packed 1 thread / 2 threads"] = (
                table["edge_packed"]["min_ms"] / table["edge_packed_2t"]["min_ms"])
    for key, what in (("edge_packed_int8", "int8 segmentor"),
                      ("edge_packed_int8_static", "int8 refiner static part"),
                      ("edge_packed_int8_all", "int8 segmentor and refiner static part")):
        if key in image and "ort_stock_fp" in image:
            out[f"image: ORT stock fp twin / edge packed with {what}"] = (
                image["ort_stock_fp"]["min_ms"] / image[key]["min_ms"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from reference.memory import keep_freed_memory

    # every engine under the allocator policy hidiff-edge predict sets (reference.memory):
    # otherwise where glibc settles, and with it ~15 ms per image, is a matter of chance
    kept = keep_freed_memory()
    if args._rss:
        return rss_child(args)
    import onnxruntime
    from edge_int8 import CALIBRATION_IMAGES, dice_change, int8_copy

    from edge_runtime import packed as kernel

    started, load_start = time.perf_counter(), os.getloadavg()
    preset_name = args.preset or ("cpu-small" if args.quick else "cpu-base")
    if args.export is None:
        cache = Path(tempfile.gettempdir()) / f"hidiff-bench-{preset_name}"
        args.model_dir, args.export = build_model(preset_name, cache)
    work = tempfile.TemporaryDirectory(prefix="hidiff-bench-int8-")
    args.int8_export = int8_copy(args.export, args.data, Path(work.name),
                                 8 if args.quick else CALIBRATION_IMAGES)
    runs = args.runs or (3 if args.quick else 25)
    image_runs = 1 if args.quick else 5
    args.x = _input(args.export, args.seed)
    names = [n for n in ENGINES if (n in QUICK if args.quick else _available(n, args))]
    real = {name: ENGINES[name](args) for name in names}
    for e in real.values():
        e.x = args.x
    packed = real["edge_packed"]
    weights = binary_layers(args.export, packed.feeds)
    layers = bench_layers(weights, runs)
    step = round_robin({k: e.step for k, e in real.items()}, runs)
    image = round_robin({k: e.image for k, e in real.items()}, image_runs)
    segmentor = round_robin({
        "fp32": lambda: packed.session.segment(args.x),
        "int8": lambda: real["edge_packed_int8"].session.segment(args.x)}, runs)
    static_in = {"image": args.x, **packed.session.segment(args.x)}
    static = round_robin({
        "fp32": lambda: packed.session.refiner.prepare(static_in),
        "int8": lambda: real["edge_packed_int8_all"].session.refiner.prepare(static_in)}, runs)
    seeds = (0, 1) if args.quick else (0, 1, 2, 3)
    agree = report.agreement({**real, "_model_dir": args.model_dir}, seeds)
    rss = measure_rss(args, QUICK_RSS if args.quick else names)
    chaos = None if args.quick or args.model_dir is None else report.torch_sensitivity(
        args.model_dir, args.x, args.seed)
    dice = None if args.dice_model is None else dice_change(args.dice_model, args.data)
    plan, facts = packed.session.refiner.executor.stats, packed.session.facts
    float_bytes = sum(spec["weight"].size * 4 for _, _, spec in weights)
    packed_bytes = sum(w.shape[0] * w.shape[2] * w.shape[3] * ((w.shape[1] + 31) // 32) * 4
                       for w in (spec["weight"] for _, _, spec in weights))
    ratios = _ratios(step, image)
    breakdown, pieces = report.step_breakdown(packed)
    if "ort_stock_fp" in step:  # what the real-valued layers alone allow
        ratios["step bound if binary convs + NumPy ops were free: ORT stock fp / packed ORT "
               "part"] = step["ort_stock_fp"]["min_ms"] / breakdown["ort"]
    result = {
        "machine": {"cpu": report.cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                    "kernel_path": kernel.current_path(),
                    "kernel_paths": list(kernel.available_paths()),
                    "keep_freed_memory": kept},
        "model": {"preset": preset_name, "input_size": list(facts.input_size),
                  "sampling_steps": facts.sampling_steps,
                  "sampling_samples": facts.sampling_samples, "export": str(args.export)},
        "quick": args.quick, "runs": runs, "image_runs": image_runs,
        "load_average_start_end": [load_start, os.getloadavg()],
        "layers": layers, "step": step, "image": image, "segmentor": segmentor,
        "refiner_static": static,
        "engine_labels": {k: e.name for k, e in real.items()},
        "rss_mib": rss, "disk_bytes": {k: sum(f.stat().st_size for f in e.files)
                                       for k, e in real.items()},
        "binary_conv_weights": {"float_bytes_in_file": float_bytes,
                                "packed_bytes_in_memory": packed_bytes},
        "plan": {"packed": plan.packed, "chained": plan.packed_chained, "fused": plan.fused,
                 "emit_next_words": plan.packed_words, "numpy": plan.numpy,
                 "ort": plan.ort, "ort_sessions": plan.ort_sessions,
                 "fallbacks": plan.fallbacks},
        "packed_step_breakdown_ms": breakdown, "packed_step_pieces": pieces,
        "ratios": ratios, "agreement": agree, "torch_sensitivity_1ulp": chaos,
        "int8_dice": dice,
        "rewrites": packed.session.refiner.rewrites.counts(),
        "notes": report.NOTES.format(float_mb=float_bytes / 2**20,
                                     packed_kb=packed_bytes / 1024,
                                     rewrites=", ".join(
                                         f"{k} x{n}" for k, n in
                                         packed.session.refiner.rewrites.counts().items()),
                                     ort_sessions=plan.ort_sessions),
        "wall_s": time.perf_counter() - started,
    }
    work.cleanup()
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
