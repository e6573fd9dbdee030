"""What makes a HiDiff training iteration faster on a CPU, and whether it changes the results.

    python benchmarks/train_speed.py                       # cpu-small, batch 8, Kvasir-SEG
    python benchmarks/train_speed.py --quick --results /tmp/speed   # a smoke run (CI)

One alternating iteration (``hidiff.training.steps.train_step``: refiner phase with self-align
0.5, then the segmentor phase; no fp twin, as ``hidiff train`` runs by default), one segmentor
pre-training step and one refiner-alone iteration (the last phase of ``--refine-after-minutes``:
the refiner phase, segmentor frozen), timed per variant on the same batches from the same
initial networks:

- ``default``: what ``hidiff train`` does (float32, NCHW, torch's threads);
- ``threads=1``: one intra-op thread (the default uses every core);
- ``channels_last``: networks and batches in ``torch.channels_last``;
- ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the iteration;
- ``compile``: ``torch.compile`` of both networks (the compile time is reported apart).

"Changes results" is the largest difference of the refiner's loss over the timed iterations
from the default's (same draws): 0 means the variant is the same computation. Results:
``<results>.md`` / ``.json`` (default ``benchmarks/results/train_speed``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hidiff.training.distributed import DistContext  # noqa: E402
from hidiff.training.run_state import build_state  # noqa: E402
from hidiff.training.setup import TrainArgs, prepare_run  # noqa: E402
from hidiff.training.steps import DiffusionDraws, train_step  # noqa: E402

VARIANTS = ("default", "threads=1", "channels_last", "bf16", "compile")


def _batches(state, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(count):
        _, batch = next(state.batches)
        out.append((batch["image"], batch["mask"]))
    return out


def run_variant(name: str, state, batches, iters: int, warmup: int) -> dict:
    nets = copy.deepcopy(state.nets)
    # fresh optimizers with hidiff train's settings (lr, weight decay) on the copies
    def fresh(opt, params):
        keep = {k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        return torch.optim.AdamW(params, **keep)

    opts = type(state.opts)(fresh(state.opts.segmentor, nets.segmentor.parameters()),
                            fresh(state.opts.refiner, nets.refiner.parameters()))
    draws = DiffusionDraws(state.diffusion.num_steps, seed=0)
    threads = torch.get_num_threads()
    fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
    compile_s = 0.0
    if name == "threads=1":
        torch.set_num_threads(1)
    if name == "channels_last":
        nets.segmentor.to(memory_format=fmt)
        nets.refiner.to(memory_format=fmt)
    if name == "compile":
        start = time.perf_counter()
        nets.segmentor = torch.compile(nets.segmentor)
        nets.refiner = torch.compile(nets.refiner)
        compile_s = time.perf_counter() - start  # lazy: most of it lands in the warm-up
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16"
                else contextlib.nullcontext())
    losses, times, pre_times, refine_times = [], [], [], []
    try:
        for i, (x, y0) in enumerate(batches[:warmup + iters]):
            x = x.contiguous(memory_format=fmt)
            start = time.perf_counter()
            with autocast:
                logs = train_step(nets, opts, state.diffusion, draws, x, y0, state.settings)
            elapsed = time.perf_counter() - start
            if i < warmup:
                compile_s += elapsed if name == "compile" else 0.0
                continue
            times.append(elapsed)
            losses.append(logs["loss_refiner"])
            start = time.perf_counter()
            with autocast:
                train_step(nets, opts, state.diffusion, draws, x, y0, state.settings,
                           pretrain=True)
            pre_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with autocast:
                train_step(nets, opts, state.diffusion, draws, x, y0, state.settings,
                           refine_only=True)
            refine_times.append(time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a variant this torch / CPU cannot run is a result
        return {"variant": name, "error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        torch.set_num_threads(threads)
    return {"variant": name, "iteration_s": sorted(times)[len(times) // 2],
            "pretrain_step_s": sorted(pre_times)[len(pre_times) // 2],
            "refine_step_s": sorted(refine_times)[len(refine_times) // 2],
            "losses": losses, "compile_s": compile_s}


def report(rows: list[dict], args, meta: dict) -> str:
    base = next((r for r in rows if r["variant"] == "default" and "error" not in r), None)
    lines = ["# Training iteration speed on this CPU", "",
             f"`python benchmarks/train_speed.py {' '.join(sys.argv[1:])}` on {meta['cpu']} "
             f"({meta['cores']} cores, torch {torch.__version__}, {meta['threads']} threads by "
             f"default); preset `{args.preset}`, batch {args.batch_size}, {args.iters} timed "
             f"iterations after {args.warmup} warm-up, median seconds.", "",
             "| variant | HiDiff iteration (s) | vs default | segmentor pre-training step (s) "
             "| refiner-alone iteration (s) | max refiner-loss change vs default |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        extra = f" (+{r['compile_s']:.0f} s warm-up)" if r["variant"] == "compile" else ""
        if base is None:
            ratio = change = "n/a"
        else:
            ratio = f"{base['iteration_s'] / r['iteration_s']:.2f}x"
            diffs = [abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True)]
            change = f"{max(diffs):.2g}"
        lines.append(f"| {r['variant']} | {r['iteration_s']:.3f}{extra} | {ratio} | "
                     f"{r['pretrain_step_s']:.3f} | {r['refine_step_s']:.3f} | {change} |")
    if any(r["variant"] == "compile" for r in rows):
        lines += ["", "`compile`: the warm-up iterations (compilation included) are reported "
                  "apart; the refiner and segmentor phases switch train / eval mode and "
                  "requires_grad every iteration, which may make dynamo recompile or fall back "
                  "to eager for parts of the graph."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(os.environ.get(
        "HIDIFF_DATA", ROOT.parent / "shared" / "data")) / "Kvasir-SEG"))
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "train_speed"))
    p.add_argument("--quick", action="store_true", help="tiny preset, 2 iterations, no compile")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if not variants:
        p.error(f"no variants; allowed: {', '.join(VARIANTS)}")
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; allowed: {', '.join(VARIANTS)}")
    if args.quick:
        args.preset, args.batch_size, args.iters, args.warmup = "tiny", 2, 2, 1
        variants = [v for v in variants if v != "compile"]
    out = Path(args.results)
    scratch = tempfile.TemporaryDirectory(prefix="hidiff-train-speed-")  # never written to
    train_args = TrainArgs(dataset="kvasir-seg", data=args.data, preset=args.preset,
                           out=str(Path(scratch.name) / "run"), max_steps=1,
                           batch_size=args.batch_size, limit_cases=8 if args.quick else 64,
                           self_align=0.5, progress=False)
    state = build_state(prepare_run(train_args), DistContext())
    batches = _batches(state, args.warmup + args.iters)
    scratch.cleanup()
    rows = []
    for name in variants:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(run_variant(name, state, batches, args.iters, args.warmup))
    meta = {"cpu": next((line.split(":", 1)[1].strip() for line in
                         Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), "unknown CPU")
            if Path("/proc/cpuinfo").exists() else "unknown CPU",
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(rows, args, meta))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
