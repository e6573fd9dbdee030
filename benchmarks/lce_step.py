"""One refiner step: Larq Compute Engine (``refiner_step.tflite``) vs onnxruntime
(``refiner_step.onnx``), batch 1, one thread, the same inputs.

LCE's hand-written binary kernels target ARM (aarch64/arm32); on x86 it runs portable C++, so
the x86 numbers say little about an ARM box. Engines are timed round-robin (one run of each per
round) so that they see the same machine load; median and minimum milliseconds over ``--runs``.

Two environments (LCE 0.16 needs numpy < 2; torch lives in the main one)::

    # main environment: a model folder (random weights of a preset, or --model-dir) + exports
    python benchmarks/lce_step.py --build DIR --preset cpu-small [--model-dir runs/pilot]
    # LCE environment: the timing
    python benchmarks/lce_step.py --export-dir DIR/onnx [--runs 30] [--json out.json]
    # LCE environment, building with the main python on the way:
    python benchmarks/lce_step.py --preset cpu-small --main-python .venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, kernel, xnnpack)
LCE_CONFIGS = [
    ("lce indirect_bgemm + xnnpack", "indirect_bgemm", True),
    ("lce indirect_bgemm", "indirect_bgemm", False),
    ("lce default bgemm", "optimized", False),
]


def build(out: Path, preset_name: str, model_dir: str | None) -> Path:
    """Main environment: model folder (random default-initialised weights unless
    ``model_dir``), its ONNX export and ``refiner_step.tflite``; returns the export folder."""
    import torch

    from export import export_model_dir
    from export.lce import export_lce

    torch.manual_seed(0)
    if model_dir is None:
        from hidiff.checkpoint import save_checkpoint
        from hidiff.config import preset
        from hidiff.data.info import DatasetInfo
        from hidiff.data.splits import load_split
        from hidiff.model_dir import CHECKPOINT, build_networks, write_model_files
        from hidiff.training.setup import model_dataset_info

        config = preset(preset_name)
        seg, ref, _ = build_networks(config, fp_twin=False)
        folder = out / "model"
        folder.mkdir(parents=True, exist_ok=True)
        info = model_dataset_info(DatasetInfo(name="kvasir-seg"), config.image_size)
        write_model_files(folder, config=config, dataset_info=info,
                          split=load_split("kvasir-seg"))
        save_checkpoint(folder / CHECKPOINT, {"step": 0, "segmentor": seg.state_dict(),
                                              "refiner": ref.state_dict(), "refiner_fp": None})
        model_dir = str(folder)
    export_model_dir(model_dir, out / "onnx")
    export_lce(out / "onnx", out / "onnx")
    return out / "onnx"


def _inputs(session, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [1 if isinstance(d, str) else d for d in i.shape]
        if i.name == "step":
            feeds[i.name] = np.ones(shape, np.int64)
        elif i.name == "y_t":
            feeds[i.name] = (rng.random(shape) < 0.5).astype(np.float32)
        else:
            feeds[i.name] = rng.random(shape).astype(np.float32)
    return feeds


def bench(export_dir: Path, runs: int) -> dict:
    import onnxruntime as ort

    from edge_runtime.lce_backend import LceRefinerStep

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(export_dir / "refiner_step.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    feeds = _inputs(session)
    want = session.run(None, feeds)[0]
    engines = {"onnxruntime float (1 thread)": lambda: session.run(None, feeds)[0]}
    for label, kernel, xnnpack in LCE_CONFIGS:
        step = LceRefinerStep(export_dir / "refiner_step.tflite", num_threads=1, kernel=kernel,
                              xnnpack=xnnpack)
        engines[label] = (lambda s: lambda: s(feeds))(step)
    diffs = {name: float(np.abs(fn() - want).max()) for name, fn in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(runs):
        for name, fn in engines.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["onnxruntime float (1 thread)"])
    signature = json.loads((export_dir / "refiner_step.lce.json").read_text())
    manifest = json.loads((export_dir / "manifest.json").read_text())["model"]
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "onnxruntime": ort.__version__, "cpu_count": os.cpu_count()},
        "model": {"preset": manifest.get("preset"), "input_size": manifest.get("input_size"),
                  "lce_ops": {k: v for k, v in signature["op_counts"].items()
                              if k.startswith("Lce")},
                  "tflite_ops": sum(signature["op_counts"].values())},
        "runs": runs,
        "results": {name: {"median_ms": round(statistics.median(t), 3),
                           "min_ms": round(min(t), 3),
                           "speedup_vs_ort": round(base / statistics.median(t), 2),
                           "max_abs_diff_vs_ort": diffs[name]} for name, t in times.items()},
        "note": "LCE targets ARM (aarch64/arm32 hand-written kernels); on x86 its binary kernels "
                "are portable C++. Batch 1, one thread, round-robin timing.",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", metavar="DIR", help="main environment: build the exports into DIR")
    p.add_argument("--preset", default="cpu-small", help="preset for random weights")
    p.add_argument("--model-dir", help="a trained model folder instead of random weights")
    p.add_argument("--export-dir", metavar="DIR", help="folder with refiner_step.onnx/.tflite")
    p.add_argument("--main-python", default=os.environ.get("HIDIFF_MAIN_PYTHON"),
                   help="main environment python used to build when --export-dir is not given")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.build:
        print(build(Path(args.build), args.preset, args.model_dir))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(args.export_dir) if args.export_dir else None
        if export_dir is None:
            if not args.main_python:
                p.error("give --export-dir, or --main-python (HIDIFF_MAIN_PYTHON) to build one")
            cmd = [args.main_python, __file__, "--build", tmp, "--preset", args.preset]
            if args.model_dir:
                cmd += ["--model-dir", args.model_dir]
            export_dir = Path(subprocess.run(cmd, check=True, capture_output=True, text=True)
                              .stdout.strip().splitlines()[-1])
        result = bench(export_dir, args.runs)
    result["model"]["preset"] = result["model"]["preset"] or args.preset
    for name, r in result["results"].items():
        print(f"{name:32s} median {r['median_ms']:8.2f} ms  min {r['min_ms']:8.2f} ms  "
              f"x{r['speedup_vs_ort']:.2f} vs ORT  max|diff| {r['max_abs_diff_vs_ort']:.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
