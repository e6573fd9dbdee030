"""Command line of the LCE target.

``hidiff export MODEL_DIR -o OUT_DIR --target lce`` (wired in :mod:`export.cli` with
:func:`add_lce_arguments` and :func:`run_lce_target`) writes the ONNX export and then
``refiner_step.tflite`` + ``refiner_step.lce.json`` into ``OUT_DIR``. Standalone::

    python -m export.lce SOURCE -o OUT_DIR [--batch N] [--keep-negative-zero] [--role ROLE]

``SOURCE``: a model folder, an ONNX export folder or an ``.onnx`` file. Exit codes: 0 success,
2 user error (the message, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_lce_arguments", "build_parser", "main", "run_lce_target"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_lce_arguments(parser: argparse.ArgumentParser, prefix: str = "--lce-") -> None:
    """``{prefix}batch`` and ``{prefix}keep-negative-zero`` (for ``hidiff export --target lce``)."""
    group = parser.add_argument_group("LCE target (--target lce)")
    group.add_argument(f"{prefix}batch", dest="lce_batch", type=_positive, default=1,
                       help="fixed batch size of refiner_step.tflite (default 1; the LCE "
                            "backend runs larger batches in chunks)")
    group.add_argument(f"{prefix}keep-negative-zero", dest="lce_canonical_zero",
                       action="store_false",
                       help="omit the +0.0 added before each LceQuantize (by default it makes "
                            "-0.0 binarize to +1 on LCE's aarch64 packer too, as sign(0) = +1 "
                            "requires; one ADD per binarized tensor)")


def run_lce_target(source: str | Path, out_dir: str | Path,
                   args: argparse.Namespace | None = None, role: str = "refiner_step"
                   ) -> list[str]:
    """Export ``source`` for LCE into ``out_dir``; returns the lines to print."""
    import json

    from .api import export_lce, signature_path

    batch = getattr(args, "lce_batch", 1) if args is not None else 1
    canonical = getattr(args, "lce_canonical_zero", True) if args is not None else True
    path = export_lce(source, out_dir, batch=batch, role=role, canonical_zero=canonical)
    sig = json.loads(signature_path(path).read_text())
    counts = sig["op_counts"]
    return [
        f"{path}  {path.stat().st_size} bytes  sha256 {sig['tflite_sha256'][:16]}",
        f"{signature_path(path)}",
        f"LCE ops: LceBconv2d {counts.get('LceBconv2d', 0)}, LceQuantize "
        f"{counts.get('LceQuantize', 0)}; {sum(counts.values())} ops in all",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.lce",
        description="export a HiDiff refiner step for the Larq Compute Engine (TFLite + LCE ops)")
    parser.add_argument("source", metavar="SOURCE",
                        help="model folder, ONNX export folder or .onnx file")
    parser.add_argument("-o", "--out", dest="out_dir", metavar="OUT_DIR", required=True)
    parser.add_argument("--role", choices=("refiner_step", "refiner_step_fp"),
                        default="refiner_step", help="which refiner (default the binary one)")
    add_lce_arguments(parser, prefix="--")
    return parser


#: what the command reports as a user error (exit 2, no traceback), as ``hidiff`` and
#: ``hidiff-edge`` do (kept here: the LCE environment has no torch, which ``hidiff`` needs)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    try:
        for line in run_lce_target(args.source, args.out_dir, args, role=args.role):
            print(line)
    except USER_ERRORS as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
