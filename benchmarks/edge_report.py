"""Analysis and report of ``benchmarks/edge.py``: the packed step's time per executor, mask
agreement, torch's own sensitivity, and the markdown (``benchmarks/results/edge.md``)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

import reference

__all__ = ["LAYER_NOTE", "NOTES", "RATIO_BASES", "TORCH_NOTE", "agreement", "cpu_name",
           "step_breakdown", "torch_sensitivity", "write_markdown"]

RATIO_BASES = (("ORT stock fp twin", "ort_stock_fp"),
               ("edge onnxruntime fp twin (split graph)", "edge_ort_fp"),
               ("edge onnxruntime binary", "edge_ort_binary"),
               ("edge packed, graph as exported (no edge_runtime.rewrite)", "edge_packed_asis"))


def torch_sensitivity(model_dir: Path, x: np.ndarray, seed: int) -> dict:
    """How far torch's own binary refiner step output moves when the image moves by one ulp
    (the size of the rounding differences between implementations): max and the share of
    outputs off by > 1e-2."""
    import torch

    from hidiff.evaluation import pipeline_from_model_dir
    from hidiff.segmentor import prior_from_logits

    pipe, outs = pipeline_from_model_dir(model_dir)[1], []
    module = pipe.refiner_module("binary")
    for image in (x, np.nextafter(x, np.float32(np.inf))):
        xt = torch.from_numpy(np.ascontiguousarray(image))
        with torch.no_grad():
            seg = pipe.segmentor(xt)
            prior = prior_from_logits(seg.logits)
            u = torch.from_numpy(np.random.default_rng(seed).random(prior.shape))
            t = torch.full((x.shape[0],), pipe.config.diffusion.num_steps, dtype=torch.long)
            outs.append(torch.sigmoid(module(xt, (u < prior).float(), prior, tuple(seg.features),
                                             t)).numpy())
    diff = np.abs(outs[0] - outs[1])
    return {"max_abs_diff": float(diff.max()), "share_off_by_1e-2": float((diff > 1e-2).mean())}


def step_breakdown(engine, repeats: int = 5) -> tuple[dict[str, float], list[dict]]:
    """Milliseconds of the packed step by executor, and every onnxruntime and native/NumPy
    piece's milliseconds with its ops (``kind`` ort / numpy), largest first (minimum per
    scheduled piece over ``repeats`` runs)."""
    executor = engine.session.refiner.executor
    best: dict[int, float] = {}
    for _ in range(repeats):
        for i, (_, t) in enumerate(executor.profile(engine.feeds)):
            best[i] = min(best.get(i, t), t)
    out: dict[str, float] = {}
    pieces = []
    for i, label in enumerate(executor.labels):
        kind = label.split(":")[0]
        out[kind] = out.get(kind, 0.0) + best[i] * 1e3
        if kind in ("ort", "numpy"):
            ops: dict[str, int] = {}
            for op in label.split(":", 1)[1].split("+"):
                ops[op] = ops.get(op, 0) + 1
            pieces.append({"kind": kind, "ms": best[i] * 1e3, "ops": ops})
    return out, sorted(pieces, key=lambda p: -p["ms"])


def agreement(engines: dict, seeds: tuple[int, ...]) -> list[dict]:
    """Masks of edge packed vs edge onnxruntime (and torch where measured) per seed."""
    rows, pipe, ort8 = [], None, None
    packed, ort_e = engines["edge_packed"].session, engines["edge_ort_binary"].session
    x = engines["edge_packed"].x
    for seed in seeds:
        pp, po = packed.predict_batch(x, seed=seed).prob, ort_e.predict_batch(x, seed=seed).prob
        mp, mo = reference.final_labels(pp), reference.final_labels(po)
        row = {"seed": seed, "pixels": mp.size,
               "packed_vs_ort_mask_mismatch": int((mp != mo).sum()),
               "packed_vs_ort_max_prob_diff": float(np.abs(pp - po).max())}
        if "edge_packed_int8_all" in engines:  # the same int8 graphs on both backends
            p8 = engines["edge_packed_int8_all"].session
            if ort8 is None:
                from edge_runtime import HiDiffSession

                ort8 = HiDiffSession(p8.model.folder, backend="onnxruntime", segmentor="int8",
                                     refiner_static="int8")
            a, b = p8.predict_batch(x, seed=seed).prob, ort8.predict_batch(x, seed=seed).prob
            row["int8_packed_vs_ort_mask_mismatch"] = int(
                (reference.final_labels(a) != reference.final_labels(b)).sum())
            row["int8_packed_vs_ort_max_prob_diff"] = float(np.abs(a - b).max())
        if "edge_packed_asis" in engines:  # the rewrites regroup float sums: rounding only
            pa = engines["edge_packed_asis"].session.predict_batch(x, seed=seed).prob
            row["rewritten_vs_as_exported_mask_mismatch"] = int(
                (mp != reference.final_labels(pa)).sum())
            row["rewritten_vs_as_exported_max_prob_diff"] = float(np.abs(pp - pa).max())
        if "torch_binary" in engines:
            import torch

            from hidiff.evaluation import pipeline_from_model_dir

            pipe = pipe or pipeline_from_model_dir(engines["_model_dir"])[1]
            mt = pipe.predict(torch.from_numpy(x), seed=seed).mask.numpy()
            row["packed_vs_torch_mask_mismatch"] = int((mp != mt).sum())
        rows.append(row)
    return rows


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (
        info.read_text().splitlines() if info.exists() else []) if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()



def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        "# Edge runtime benchmark", "",
        f"`python benchmarks/edge.py` on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, kernel path `{m['kernel_path']}`."
        f" Model: `{result['model']['preset']}` ({result['model']['input_size']}, "
        f"random weights), batch 1, "
        f"1 thread unless stated. Round-robin timing ({result['runs']} runs per step / layer, "
        f"{result['image_runs']} per image), minimum (median) ms. Load average at "
        f"start / end: {result['load_average_start_end'][0][0]:.1f} / "
        f"{result['load_average_start_end'][1][0]:.1f} (a shared 2-core machine: the minimum "
        "is the comparable figure)." + (
            " Freed memory stays in the process for every engine (glibc thresholds raised by "
            "`reference.memory.keep_freed_memory`, as `hidiff-edge predict` does)."
            if m.get("keep_freed_memory") else ""), "",
        "## Binary convolutions of the refiner: packed kernel vs onnxruntime float Conv", "",
        "| layers (3x3) | input (NCHW) | Cout | stride | packed | pack + packed | ORT float "
        "| speedup | packed, bits out | speedup, bits out | G MAC/s packed / bits out / ORT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        names = r["layers"]
        label = names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
        line = (f"| {label} | {'x'.join(map(str, r['input_nchw']))} | {r['out_channels']} | "
                f"{r['stride'][0]} | {r['packed_ms']:.3f} | {r['pack_and_packed_ms']:.3f} "
                f"| {r['ort_float_conv_ms']:.3f} | {r['speedup']:.1f}x |")
        if "packed_bits_out_ms" in r:  # reports written before these columns lack them
            rate = [r["macs"] / (r[k] * 1e6)
                    for k in ("packed_ms", "packed_bits_out_ms", "ort_float_conv_ms")]
            line += (f" {r['packed_bits_out_ms']:.3f} | {r['speedup_bits_out']:.1f}x | "
                     f"{rate[0]:.0f} / {rate[1]:.0f} / {rate[2]:.0f} |")
        else:
            line += " | | |"
        lines.append(line)
    lines += ["", LAYER_NOTE]
    model = result["model"]
    lines += ["", "## One refiner step and one image", "",
              f"`one step`: batch 1 at step T. `one image`: the model's default sampling, "
              f"{model['sampling_steps']} step(s) x {model['sampling_samples']} chain(s) (the "
              "chains one batch), segmentor included.", "",
              "| engine | one step | one image | peak RSS (MiB) | model bytes read |",
              "|---|---|---|---|---|"]
    for name, label in result["engine_labels"].items():
        st, im, rss = result["step"][name], result["image"][name], result["rss_mib"].get(name)
        lines.append(f"| {label} | {st['min_ms']:.1f} ({st['median_ms']:.1f}) | "
                     f"{im['min_ms']:.0f} ({im['median_ms']:.0f}) | "
                     f"{'-' if rss is None else f'{rss:.0f}'} | {result['disk_bytes'][name]:,} |")
    seg = result["segmentor"]
    lines += ["", f"Baseline RSS of a bare `python` with numpy + onnxruntime imported: "
              f"{result['rss_mib'].get('baseline', float('nan')):.0f} MiB.", "",
              f"Segmentor alone (1 thread): fp32 {seg['fp32']['min_ms']:.1f} "
              f"({seg['fp32']['median_ms']:.1f}) ms, int8 {seg['int8']['min_ms']:.1f} "
              f"({seg['int8']['median_ms']:.1f}) ms: "
              f"**{seg['fp32']['min_ms'] / seg['int8']['min_ms']:.2f}x**.", ""]
    static = result.get("refiner_static")
    if static:
        lines += [f"Refiner static part alone (once per image, 1 thread): fp32 "
                  f"{static['fp32']['min_ms']:.1f} ({static['fp32']['median_ms']:.1f}) ms, int8 "
                  f"{static['int8']['min_ms']:.1f} ({static['int8']['median_ms']:.1f}) ms: "
                  f"**{static['fp32']['min_ms'] / static['int8']['min_ms']:.2f}x**.", ""]
    lines += [
              "## Ratios (issue 12 targets: binary conv >= 16x; step >= 8x at 1 thread, >= 6x "
              "at 2 threads; image >= 6x and < 150 ms at 1 thread)", ""]
    for key, value in result["ratios"].items():
        lines.append(f"- {key}: **{value:.2f}x**")
    dice = result.get("int8_dice")
    if not dice:
        lines += ["", "int8 graphs, Dice change: not measured in this run (`--dice-model "
                  "EXPORT`, a trained Kvasir-SEG export)."]
    if dice:
        lines += ["", "## int8 graphs: Dice change", "",
                  f"`--dice-model {dice['export']}`: {dice['cases']} Kvasir-SEG {dice['subset']} "
                  f"images, calibrated on {dice['calibration_images']} train images, seed 0, "
                  "Dice at image size (change against all fp32 in brackets).", ""]
        kinds = [k for k in DICE_COLUMNS if k in dice]
        lines += ["| predictor | " + " | ".join(DICE_COLUMNS[k] for k in kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for key, label in (("segmentor", "segmentor alone"), ("hidiff", "HiDiff binary")):
            cells = [f"{dice[k][key]:.4f}" + (
                f" ({dice[k][key] - dice['fp32'][key]:+.4f})" if k != "fp32" else "")
                for k in kinds]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if "as_exported" in dice:
            lines += ["", f"The graph rewrites on the same images (fp32 segmentor): HiDiff binary "
                          f"Dice {dice['fp32']['hidiff']:.4f} rewritten, "
                          f"{dice['as_exported']['hidiff']:.4f} as exported; "
                          f"{dice['rewrite_mask_pixels_differing']} of "
                          f"{dice['mask_pixels']:,} mask pixels differ."]
    b = result["packed_step_breakdown_ms"]
    lines += ["", "## Where the packed step's time goes", "",
              "| executor | ms |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in b.items()]
    for kind, title in (("ort", "onnxruntime pieces"),
                        ("numpy", "native / NumPy pieces (more than 0.1 ms)")):
        rows = [p for p in result["packed_step_pieces"] if p.get("kind", "ort") == kind
                and (kind == "ort" or p["ms"] > 0.1)]
        lines += ["", f"{title} of the packed step, largest first:", "",
                  "| ms | ops |", "|---|---|"] + [
            f"| {p['ms']:.2f} | {', '.join(f'{op} x{n}' for op, n in p['ops'].items())} |"
            for p in rows]
    lines += ["", result["notes"], "", "## Mask agreement (model space, per seed)", "",
              "| seed | pixels | packed vs onnxruntime | max prob diff | same, both int8 graphs "
              "(max prob diff) | packed vs torch | rewritten vs as exported (max prob diff) |",
              "|---|---|---|---|---|---|---|"] + [
        f"| {a['seed']} | {a['pixels']} | {a['packed_vs_ort_mask_mismatch']} | "
        f"{a['packed_vs_ort_max_prob_diff']:.3g} | "
        f"{a.get('int8_packed_vs_ort_mask_mismatch', '-')} "
        f"({a.get('int8_packed_vs_ort_max_prob_diff', float('nan')):.3g}) | "
        f"{a.get('packed_vs_torch_mask_mismatch', '-')} "
        f"| {a.get('rewritten_vs_as_exported_mask_mismatch', '-')} "
        f"({a.get('rewritten_vs_as_exported_max_prob_diff', float('nan')):.2g}) |"
        for a in result["agreement"]] + ["", TORCH_NOTE.format(**(result[
            "torch_sensitivity_1ulp"] or {"max_abs_diff": float("nan"),
                                        "share_off_by_1e-2": float("nan")})), ""]
    path.write_text("\n".join(lines))


DICE_COLUMNS = {"fp32": "all fp32", "int8": "int8 segmentor",
                "int8_static": "int8 refiner static part", "int8_all": "both int8"}

TORCH_NOTE = (
    "Packed and onnxruntime are bit-identical (every step's output). Torch (oneDNN) and "
    "onnxruntime (MLAS) round the real layers differently (~1e-6); where a refiner activation "
    "lies within that of 0 it binarizes the other way, and this deep random binary refiner "
    "amplifies such flips through its ~30 binary layers: torch against *itself*, the image "
    "moved by one ulp, moves the step output by up to {max_abs_diff:.2g} ("
    "{share_off_by_1e-2:.0%} of the outputs by more than 1e-2). Against torch the masks can "
    "agree only as far as that sensitivity allows (on the tiny model of "
    "tests/edge/test_session.py the trajectories are checked sample by sample). The last "
    "column is the packed backend with and without `edge_runtime.rewrite`: the rewrites "
    "regroup float sums and round folded weights again (~1e-7 per step output), and this "
    "random refiner amplifies such differences into the mask as it does torch's; on a trained "
    "model it is the few pixels of the int8 section's last line."
)

LAYER_NOTE = (
    "`packed`: float32 NHWC output, the like-for-like of onnxruntime's float Conv (the speedup "
    "the targets name); `pack + packed` also packs the float NCHW input; `bits out`: the same "
    "conv writing the sign bits the next binary layer reads (one compare per 16 outputs), so "
    "nearly its XOR / popcount loop alone. Each 512 binary multiply-accumulates of that loop are "
    "one XOR, one VPOPCNTD and one add of 512-bit vectors; the bits-out throughput is what this "
    "core sustains for them, and its ratio to onnxruntime's float throughput (last column) "
    "bounds the float-output speedup before the epilogue's convert, scale, bias and 16 floats "
    "stored per vector. The float outputs go into a reused buffer that the round robin's "
    "onnxruntime run has evicted from the caches, so the large layers run slower here than "
    "timed alone.")

NOTES = (
    "Notes. `one step` is what each engine does per reverse step: the stock ORT engines run the "
    "whole exported refiner graph; the edge backends only its per-step part (image- and "
    "step-only work is cached per image / per step value), after rewriting its real-valued "
    "layers into cheaper forms equal in exact arithmetic (`edge_runtime/rewrite.py`: "
    "{rewrites}; `graph as exported` skips them). The packed step runs the binary "
    "convs on the native kernel with their neighbours fused into its epilogue (the TB threshold "
    "subtraction before packing, the residual add, RPReLU's add / PReLU / add, and the next "
    "layer's packing: one pass over each feature map). Natively in NHWC too, checked bit for "
    "bit against onnxruntime when the model loads: the stem's convolutions of the 0/1 state y_t "
    "as table lookups (`edge_runtime/lut.py`; the two of the stem in one pass, the first "
    "one's sum never stored), the 1 x 1 convolutions in MLAS's order of "
    "operations (`edge_runtime/pointwise.py`), the shortcut's 2 x 2 average pools "
    "(`edge_runtime/pool.py`), the head's shifted sum of its taps (`edge_runtime/shifted.py`); "
    "exact by construction: the decoders' 2x upsampling (a copy, `edge_runtime/resize.py`; "
    "added to their skip's 1 x 1 conv as it is stored, `edge_runtime/upadd.py`) and "
    "runs of elementwise ops in one pass each, one float32 operation per node in graph order "
    "(`edge_runtime/chain.py`); the rest (the X-Former, the head's sigmoid) in onnxruntime "
    "pieces, on one thread when they hold no convolution. The result is bit-identical to "
    "the edge onnxruntime backend. ORT pieces per step: {ort_sessions}. The binary conv weights "
    "are {float_mb:.1f} MiB of float32 +-1 in the ONNX file and {packed_kb:.0f} KiB packed in "
    "memory. For one image, the per-image values the step broadcasts over its S chains are "
    "kept once, not S times (`RefinerRunner.batch_shared`); the static part's maps that the "
    "step reads only in NHWC come out of onnxruntime in NHWC; a batch of chains runs in "
    "chunks of at most 16 MiB per map (`edge_runtime.refiner.CHUNK_BYTES`: larger maps come "
    "from fresh pages every time). With 2 threads the native passes hand half of each pass to "
    "a persistent worker thread (`edge_runtime/_packed/parallel.c`)."
)
