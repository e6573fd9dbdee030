"""Micro benchmark: packed XNOR-popcount binary conv (each kernel path) vs onnxruntime float Conv.

Batch 1, one thread, 3x3 kernels with padding 1; median (and minimum) milliseconds over N runs.
The engines are timed round-robin (one run of each per round) so that they see the same machine
load, which matters on small shared machines. The packed kernel is timed on its hot path:
pre-packed NHWC input, prepared weights, float32 NHWC output written into a reused buffer. Extra
columns: the same conv with packed output (``thresholds``: consecutive binary layers stay packed)
and the cost of packing the float NCHW input.

    python benchmarks/binary_conv.py [--quick] [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_runtime import packed as K  # noqa: E402

# (height = width, in channels, out channels, stride)
SHAPES = [
    (128, 64, 64, 1),
    (64, 128, 128, 1),
    (256, 32, 32, 1),
    (32, 256, 256, 1),
    (128, 64, 64, 2),
    (64, 128, 128, 2),
    (256, 32, 32, 2),
    (32, 256, 256, 2),
]


def ort_conv_session(w: np.ndarray, x_shape: tuple[int, ...], stride: int) -> ort.InferenceSession:
    """One-node float32 Conv model (padding 1), single-threaded CPU session."""
    out = x_shape[2] + 2 - 3
    y_shape = [x_shape[0], w.shape[0], out // stride + 1, (x_shape[3] - 1) // stride + 1]
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[stride] * 2)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes by default
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_round_robin(fns: dict, runs: int, warmup: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def bench_shape(size: int, cin: int, cout: int, stride: int, runs: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    session = ort_conv_session(w, x.shape, stride)
    x_words = K.pack_nchw(x)
    fns = {"ort": lambda: session.run(None, {"x": x})}
    layers = {}
    for path in K.available_paths():
        layer = K.PackedBinaryConv(w, stride=stride, padding=1, path=path,
                                   thresholds=np.zeros(cout, np.float32))
        out = np.empty(layer.output_shape(1, size, size), np.float32)
        layers[path] = layer
        fns[path] = (lambda lay, o: lambda: lay(x_words, out=o))(layer, out)
    best = K.available_paths()[0]
    fns[f"{best}_packed_out"] = lambda: layers[best].forward_packed(x_words)
    fns["pack_nchw"] = lambda: K.pack_nchw(x)
    times = time_round_robin(fns, runs, warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    return {
        "shape": f"{size}x{size} {cin}->{cout} s{stride}",
        "binary_macs": int(layers[best].output_shape(1, size, size)[1] ** 2 * cout * cin * 9),
        "median_ms": med,
        "min_ms": low,
        "speedup_median": {p: med["ort"] / med[p] for p in K.available_paths()},
        "speedup_min": {p: low["ort"] / low[p] for p in K.available_paths()},
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 runs, stride-1 shapes only")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per engine (30)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    runs = args.runs or (5 if args.quick else 30)
    shapes = [s for s in SHAPES if s[3] == 1] if args.quick else SHAPES
    paths = K.available_paths()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = [bench_shape(*shape, runs=runs, warmup=2 if args.quick else 5) for shape in shapes]
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    best = paths[0]
    header = ["shape", "ORT float"] + [f"{p}" for p in paths] + [f"{best} packed out", "pack"]
    print(f"median ms (speedup vs ORT) over {runs} runs, min ms in brackets; 1 thread, batch 1")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        med, low = r["median_ms"], r["min_ms"]
        cells = [r["shape"], f"{med['ort']:.2f} [{low['ort']:.2f}]"]
        cells += [f"{med[p]:.3f} ({r['speedup_median'][p]:.1f}x) [{low[p]:.3f}, "
                  f"{r['speedup_min'][p]:.1f}x]" for p in paths]
        cells += [f"{med[f'{best}_packed_out']:.3f}", f"{med['pack_nchw']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"cpu: {cpu_model()}; onnxruntime {ort.__version__}; load avg {load_before} -> "
          f"{load_after}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "runs": runs, "paths": list(paths), "cpu": cpu_model(),
            "onnxruntime": ort.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "loadavg_before": load_before,
            "loadavg_after": load_after, "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
