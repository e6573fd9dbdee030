"""``hidiff-edge``: torch-free prediction with an exported HiDiff model.

    hidiff-edge predict --model DIR IMAGE_OR_FOLDER... -o OUT [--overlay] [--labels DIR]
                        [--backend packed|onnxruntime] [--refiner binary|fp]
                        [--segmentor fp32|int8] [--refiner-static fp32|int8]
                        [--steps N] [--samples S] [--estimate E] [--uncertainty]
                        [--seed S] [--threads T] [--overwrite] [--no-progress]
    hidiff-edge info --model DIR [--backend ...] [--refiner ...] [--segmentor ...]
                     [--refiner-static ...]
    hidiff-edge quantize --model DIR IMAGE_OR_FOLDER... [--part segmentor|refiner_static]
                         [--max-images N] [--overwrite]

``predict`` writes ``OUT/<stem>.png`` per image (0/255 for a binary model, label values for a
multi-class one) at the image's size, and with ``--overlay`` ``OUT/<stem>_overlay.png``; with
``--uncertainty`` ``OUT/<stem>_uncertainty.png`` (the spread of the S chains' estimates); with
``--labels DIR`` it prints Dice and HD95 (``reference.metrics``) per image and their means.
Before anything is written the model is loaded and checked and every input decoded, so a bad
model folder or image fails with nothing left behind; files are written under a temporary name
and renamed. Images are read upright (EXIF orientation). An input (image or label) is never
overwritten, and an output file that already exists is refused unless ``--overwrite``.
``--threads`` above the CPUs this process may use is capped, with a warning; with more than
one, the packed backend's native passes keep worker threads that spin for 0.2 ms after each
pass before they sleep (so that the next pass starts at once). ``predict`` keeps freed memory
in the process (glibc, :func:`reference.memory.keep_freed_memory`): each image reuses the
pages of the one before instead of faulting in fresh ones. Errors print
``hidiff-edge <command>: error: <message>`` on stderr and exit 2.

``quantize`` adds ``segmentor_int8.onnx`` and ``refiner_static_int8.onnx`` (the binary refiner's
per-image part) to the model folder, or the ``--part`` named (repeatable): onnxruntime static
quantization calibrated on the given images, :mod:`edge_runtime.quantize`; ``--segmentor int8``
and ``--refiner-static int8`` use them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reference.sampling import ESTIMATES

__all__ = ["build_parser", "main"]

PROG = "hidiff-edge"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="exported model folder (manifest.json + ONNX graphs)")
    p.add_argument("--backend", choices=("packed", "onnxruntime"), default=None,
                   help="packed: binary convs on the native XNOR-popcount kernel (default "
                        "where built); onnxruntime: stock ORT")
    p.add_argument("--refiner", choices=("binary", "fp"), default="binary",
                   help="the binary refiner (HiDiff, default) or the full-precision twin")
    p.add_argument("--segmentor", choices=("fp32", "int8"), default="fp32",
                   help="fp32 (default) or int8: the graph 'hidiff-edge quantize' adds")
    p.add_argument("--refiner-static", choices=("fp32", "int8"), default="fp32",
                   help="the binary refiner's per-image part: fp32 (default) or int8, the graph "
                        "'hidiff-edge quantize' adds")
    p.add_argument("--threads", type=_positive, default=1, help="threads (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="torch-free HiDiff inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    text = "predict masks for images or folders of images"
    p = sub.add_parser("predict", help=text, description=text)
    _common(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--steps", type=_positive, default=None,
                   help="sampling steps (default: the model's)")
    p.add_argument("--samples", type=_positive, default=None,
                   help="chains averaged per image (default: the model's)")
    p.add_argument("--estimate", choices=ESTIMATES, default=None,
                   help="each chain's estimate: its last y0 estimate or the mean over its steps "
                        "(default: the model's)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the uniforms (default 0)")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <stem>_uncertainty.png, the spread across the chains")
    p.add_argument("--labels", metavar="DIR",
                   help="ground-truth masks (same stems): print Dice / HD95 per image and mean")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (never an input)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_predict)
    text = "describe an exported model and the kernel path this CPU gets"
    i = sub.add_parser("info", help=text, description=text)
    _common(i)
    i.set_defaults(handler=_info)
    text = ("add int8 graphs (the segmentor, the refiner's per-image part) to an exported "
            "model, calibrated on your images")
    q = sub.add_parser("quantize", help=text, description=text)
    q.add_argument("--model", required=True, metavar="DIR",
                   help="exported model folder (manifest.json + ONNX graphs)")
    q.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="calibration images, like the ones the model will see")
    q.add_argument("--part", action="append", choices=("segmentor", "refiner_static"),
                   default=None, help="quantize only this part (repeatable; default both)")
    q.add_argument("--max-images", type=_positive, default=32,
                   help="calibrate on the first N images (natural order; default 32)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the model's existing int8 graphs")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(handler=_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        # the runtime's warnings (e.g. threads capped to the CPUs) as one line each
        warnings.filterwarnings("always", category=RuntimeWarning, module=r"edge_runtime\.")
        warnings.showwarning = lambda message, *_args, **_kw: print(
            f"{PROG} {args.command}: warning: {message}", file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        message = str(err) if not isinstance(err, OSError) or not err.filename else (
            f"{err.filename}: {err.strerror or err}")
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


# -- predict ------------------------------------------------------------------------------------
def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import reference
    from reference.files import make_folder, mask_pixels, remove_made_folders, write_png
    from reference.memory import keep_freed_memory

    from . import images
    from .cli_io import collect_images, match_labels, metrics_line, overlay, read_labels
    from .session import HiDiffSession

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output path exists and is not a folder")
    keep_freed_memory()  # each image reuses the pages of the one before (reference.memory)
    session = HiDiffSession(args.model, backend=args.backend, threads=args.threads,
                            refiner=args.refiner, segmentor=args.segmentor,
                            refiner_static=args.refiner_static)
    session.sampler(args.steps, args.samples, estimate=args.estimate)  # validates them
    facts = session.facts
    files = collect_images(args.inputs)
    kinds = [""] + ["_overlay"] * args.overlay + ["_uncertainty"] * args.uncertainty
    outputs = [out_dir / f"{p.stem}{kind}.png" for p in files for kind in kinds]
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{out_dir / dup}: two outputs of this run would have this name; "
                         f"rename one of the inputs")
    labels = match_labels(files, Path(args.labels)) if args.labels else None
    inputs = {p.resolve(): p for p in files + (list(labels.values()) if labels else [])}
    for target in outputs:
        if target.resolve() in inputs:
            raise ValueError(f"{inputs[target.resolve()]}: an input would be overwritten by "
                             f"{target.name}; choose another output folder")
    existing = [t for t in outputs if t.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]}: already exists; pass --overwrite to replace the "
                         f"outputs of an earlier run ({len(existing)} file(s))")
    sizes = {}
    for path in files:  # decode every input (and check every label) before writing anything
        sizes[path] = images.read_image(path, facts.in_channels).shape[:2]
    gts = {}
    if labels is not None:
        for path in files:
            gts[path] = read_labels(labels[path], facts.num_classes)
            if gts[path].shape != sizes[path]:
                raise ValueError(f"{labels[path]}: mask size {gts[path].shape[::-1]} (WxH) "
                                 f"differs from image size {sizes[path][::-1]}")

    created = make_folder(out_dir)
    written: list[Path] = []
    scores: list[tuple[float, float]] = []
    try:
        bar = tqdm(files, desc="predict", unit="image", disable=args.no_progress,
                   leave=False, file=sys.stderr)
        for path in bar:
            rgb = images.read_image(path, facts.in_channels)
            pred = session.predict(rgb, steps=args.steps, samples=args.samples, seed=args.seed,
                                   estimate=args.estimate)
            gt = gts.get(path)
            written.append(write_png(out_dir / f"{path.stem}.png",
                                     mask_pixels(pred.mask, facts.num_classes)))
            if args.overlay:
                written.append(write_png(out_dir / f"{path.stem}_overlay.png",
                                         overlay(rgb, pred.mask, gt)))
            if args.uncertainty:
                written.append(write_png(out_dir / f"{path.stem}_uncertainty.png",
                                         reference.uncertainty_pixels(pred.spread)))
            if gt is not None:
                line, score = metrics_line(path.name, pred.mask, gt)
                scores.append(score)
                tqdm.write(line, file=sys.stdout)
    except BaseException:
        if not written:
            remove_made_folders(created)
        raise
    if scores:
        print(_mean_line(scores))
    print(f"wrote {len(files)} mask(s) to {out_dir}", file=sys.stderr)
    return 0


def _mean_line(scores: list[tuple[float, float]]) -> str:
    dice = np.array([s[0] for s in scores], dtype=np.float64)
    hd = np.array([s[1] for s in scores], dtype=np.float64)
    fd, fh = dice[np.isfinite(dice)], hd[np.isfinite(hd)]
    mean_d = f"{fd.mean():.4f}" if fd.size else "nan"
    mean_h = f"{fh.mean():.2f}" if fh.size else "nan"
    skipped = (len(dice) - fd.size) + (len(hd) - fh.size)
    note = f"  ({skipped} non-finite value(s) left out)" if skipped else ""
    return f"mean  dice {mean_d}  hd95 {mean_h}  over {len(scores)} image(s){note}"


# -- info ---------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from .cli_io import info_lines
    from .session import HiDiffSession

    session = HiDiffSession(args.model, backend=args.backend, threads=args.threads,
                            refiner=args.refiner, segmentor=args.segmentor,
                            refiner_static=args.refiner_static)
    for line in info_lines(session):
        print(line)
    return 0


# -- quantize -----------------------------------------------------------------------------------
def _quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .export_format import FILES
    from .quantize import INT8_ROLE, PARTS, STATIC_INT8_ROLE, quantize_model

    bars: dict[str, tqdm] = {}

    def progress(part: str, done: int, total: int) -> None:
        if part not in bars:
            for bar in bars.values():
                bar.close()
            bars[part] = tqdm(desc=f"calibrate {part}", unit="image", total=total, leave=False,
                              disable=args.no_progress, file=sys.stderr)
        bars[part].update(done - bars[part].n)

    try:
        paths = quantize_model(args.model, images_from=args.inputs,
                               parts=tuple(args.part or PARTS), max_images=args.max_images,
                               overwrite=args.overwrite, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    flags = {FILES[INT8_ROLE]: "--segmentor int8", FILES[STATIC_INT8_ROLE]: "--refiner-static int8"}
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size:,} bytes); use it with {flags[path.name]}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
