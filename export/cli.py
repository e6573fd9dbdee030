"""Command line: ``export MODEL_DIR -o OUT_DIR`` and ``verify-export OUT_DIR``.

``add_export_commands(subparsers)`` adds both subcommands to an ``argparse`` subparsers object
(``hidiff``'s CLI calls it); each parser gets ``handler=(args) -> int`` as its default, the
convention of :mod:`hidiff.cli`. ``python -m export.cli ...`` runs them standalone.

Exit codes: 0 success; 1 verification failed (``verify-export``, ``export --verify``); 2 user
error (bad arguments, missing or bad files: the message, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["add_export_commands", "build_parser", "main"]

def add_export_commands(subparsers) -> None:
    """Define ``export`` and ``verify-export`` on ``subparsers`` (from ``add_subparsers``)."""
    from export.versions import SUPPORTED_IR_VERSIONS, SUPPORTED_OPSETS

    text = "export a trained model folder to ONNX (segmentor + one refiner step + manifest)"
    p = subparsers.add_parser("export", help=text, description=text)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by 'hidiff train'")
    p.add_argument("-o", "--out", dest="out_dir", metavar="OUT_DIR", required=True,
                   help="output folder (created; files of the same names are replaced)")
    p.add_argument("--opset", type=int, default=17,
                   help=f"ONNX opset, one of {', '.join(map(str, SUPPORTED_OPSETS))} (default 17)")
    p.add_argument("--ir-version", type=int, default=10,
                   help=f"IR version, one of {', '.join(map(str, SUPPORTED_IR_VERSIONS))} "
                        "(default 10)")
    p.add_argument("--verify", action="store_true",
                   help="run the graphs in onnxruntime against the torch model; fail if they "
                        "differ beyond tolerance (nothing is written then)")
    p.add_argument("--target", choices=("onnx", "lce"), default="onnx",
                   help="onnx (default), or lce: also write refiner_step.tflite for the Larq "
                        "Compute Engine (ARM edge devices)")
    from export.lce.cli import add_lce_arguments

    add_lce_arguments(p)
    p.set_defaults(handler=_run_export)

    text = "check an exported folder: files, onnxruntime vs torch / onnx.reference"
    v = subparsers.add_parser("verify-export", help=text, description=text)
    v.add_argument("out_dir", metavar="OUT_DIR", help="folder written by 'export'")
    v.add_argument("--model", metavar="MODEL_DIR",
                   help="the model folder: compare against the torch networks")
    v.add_argument("--data", metavar="PATH",
                   help="real images: an image, a folder of images or a dataset root with "
                        "images/ (default: random images)")
    v.add_argument("--batch", type=_positive, default=2, help="images per run (default 2)")
    v.add_argument("--max-steps", type=_positive, default=None,
                   help="compare the refiner at this many sampling steps at most (default all)")
    v.add_argument("--reference", action="store_true",
                   help="also run onnx.reference.ReferenceEvaluator (default: only without "
                        "--model)")
    v.set_defaults(handler=_run_verify)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_export(args: argparse.Namespace) -> int:
    from export.api import VerificationFailed, export_model_dir

    try:
        result = export_model_dir(args.model_dir, args.out_dir, opset=args.opset,
                                  ir_version=args.ir_version, verify=args.verify)
    except VerificationFailed as err:  # exit 1, as verify-export: the export itself is wrong
        print(f"error: {err}", file=sys.stderr)
        return 1
    for entry in result.manifest["files"]:
        print(f"{result.out_dir / entry['name']}  {entry['bytes']} bytes  "
              f"sha256 {entry['sha256'][:16]}")
    print(f"{result.manifest_path}")
    if result.verification is not None:
        print(result.verification.format())
    if args.target == "lce":
        from export.lce.cli import run_lce_target

        for line in run_lce_target(result.out_dir, result.out_dir, args):
            print(line)
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from export.verify import verify_export

    report = verify_export(args.out_dir, model=args.model, data=args.data, batch=args.batch,
                           max_steps=args.max_steps,
                           reference_evaluator=True if args.reference else None)
    print(report.format())
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.cli",
                                     description="HiDiff ONNX export and verification")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_export_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the standalone command line (``python -m export.cli``); returns the exit code."""
    from hidiff.cli import run_command_line

    return run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
