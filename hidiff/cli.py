"""The ``hidiff`` command line: ``train``, ``evaluate``, ``predict``, ``describe``.

Each subcommand is a thin wrapper over a documented function:

==========  ================================================  ===============================
command     function                                          prints / writes
==========  ================================================  ===============================
train       :func:`hidiff.training.train`                     the model folder ``--out DIR``
evaluate    :func:`hidiff.evaluation.evaluate`                the three-predictor table;
                                                              ``DIR/eval/<split>/``
predict     :func:`hidiff.predict.predict_paths`              PNG masks in ``-o OUT``
describe    :func:`hidiff.describe.describe`                  parameter / MAC table
==========  ================================================  ===============================

Adding a subcommand is one function decorated with :func:`subcommand`: it receives the
subparsers' ``add_parser`` result to fill in, and returns the handler ``(args) -> int``.

Every command first keeps freed memory in its process
(:func:`reference.memory.keep_freed_memory`: each training iteration or image reuses the pages of
the one before). Exit codes: 0 success; 2 user error (bad arguments, missing or unreadable files,
invalid data: ``ValueError`` incl. ``DataError``/``ModelDirError``, ``FileNotFoundError`` and the
like), printed as ``hidiff <command>: error: <message>`` without a traceback; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from reference.memory import keep_freed_memory
from reference.sampling import ESTIMATES

__all__ = ["build_parser", "main", "subcommand"]

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], Handler]]] = []
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


def subcommand(name: str, help_text: str):
    """Register ``define(parser) -> handler`` as the subcommand ``name``."""

    def register(define: Callable[[argparse.ArgumentParser], Handler]):
        _COMMANDS.append((name, help_text, define))
        return define

    return register


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _estimate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimate", choices=ESTIMATES,
                   help="each chain's estimate: its last y0 estimate or the mean over its steps "
                        "(default: the model's)")


# -- train ----------------------------------------------------------------------------------------


@subcommand("train", "train a segmentor + binary refiner into a model folder")
def _train(p: argparse.ArgumentParser) -> Handler:
    from hidiff.training.arguments import add_train_arguments, train_kwargs

    add_train_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from hidiff.training import train

        result = train(**train_kwargs(args))
        if result is not None and not args.quiet:
            print(f"{result.out}: step {result.step} (stopped by {result.stopped_by}), "
                  f"{result.elapsed_s:.1f} s this run"
                  + ("" if result.val_dice is None else f", val Dice {result.val_dice:.4f}"))
        return 0

    return run


# -- evaluate -------------------------------------------------------------------------------------


@subcommand("evaluate", "compare segmentor alone / + binary refiner / + FP refiner on a split")
def _evaluate(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder written by train")
    p.add_argument("--data", help="the dataset folder (default: the one used for training)")
    p.add_argument("--split", default="test", help="subset of the model's split (default test)")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: the model's)")
    p.add_argument("--samples", type=_positive,
                   help="chains averaged per image (default: the model's)")
    _estimate_option(p)
    p.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the Bernoulli draws (default 0)")
    p.add_argument("--limit", type=_positive, help="only the first N cases of the subset")
    p.add_argument("--overlays", type=_non_negative, default=4,
                   help="overlay PNGs of the first N cases (default 4)")
    p.add_argument("--out", help="output folder (default MODEL_DIR/eval/<split>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        from hidiff.evaluation import evaluate, format_table

        summary = evaluate(args.model_dir, data=args.data, split=args.split, steps=args.steps,
                           samples=args.samples, estimate=args.estimate, seed=args.seed,
                           out=args.out, overlays=args.overlays, limit=args.limit,
                           progress=not args.quiet)
        print(format_table(summary))
        print(f"written: {summary['out_dir']}/per_case.json, summary.json"
              + (", overlays/" if summary["overlays"] else ""))
        return 0

    return run


# -- predict --------------------------------------------------------------------------------------


@subcommand("predict", "write PNG masks for image files or folders")
def _predict(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder written by train")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image files and/or folders")
    p.add_argument("-o", "--out", required=True, help="output folder for <stem>.png masks")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: the model's)")
    p.add_argument("--samples", type=_positive,
                   help="chains averaged per image (default: the model's)")
    _estimate_option(p)
    p.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the Bernoulli draws (default 0)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <stem>_uncertainty.png, the spread across the chains")
    p.add_argument("--refiner", choices=("binary", "fp", "none"), default="binary",
                   help="binary (HiDiff, default), fp (full-precision twin), none (segmentor)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (never an input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")

    def run(args: argparse.Namespace) -> int:
        from hidiff.predict import predict_paths

        written = predict_paths(args.model_dir, args.inputs, out=args.out, steps=args.steps,
                                samples=args.samples, estimate=args.estimate, seed=args.seed,
                                refiner=args.refiner, uncertainty=args.uncertainty,
                                overwrite=args.overwrite, progress=not args.quiet)
        if not args.quiet:
            print(f"wrote {len(written)} file(s) to {args.out}")
        return 0

    return run


# -- describe -------------------------------------------------------------------------------------


@subcommand("demo", "the main job: train a small HiDiff on Kvasir-SEG, evaluate, print the table")
def _demo(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--data", help="the Kvasir-SEG folder (default: $HIDIFF_DATA/Kvasir-SEG or "
                   "../shared/data/Kvasir-SEG)")
    p.add_argument("--out", default="runs/demo", help="model folder to write (default runs/demo)")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget (default 8)")
    p.add_argument("--preset", default="cpu-small", help="model preset (default cpu-small)")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: the model's)")
    p.add_argument("--samples", type=_positive,
                   help="chains averaged per image (default: the model's)")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--limit", type=_positive, help="evaluate only the first N test cases")
    p.add_argument("--resume", action="store_true", help="continue a demo run in --out")
    p.add_argument("--fp-twin", action="store_true",
                   help="also train and evaluate the full-precision twin refiner (an ablation)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from hidiff.demo import run_demo

        result = run_demo(data=args.data, out=args.out, minutes=args.minutes, preset=args.preset,
                          steps=args.steps, samples=args.samples, seed=args.seed,
                          limit=args.limit, resume=args.resume, fp_twin=args.fp_twin,
                          progress=not args.quiet)
        print(result.table)
        print(f"model folder: {result.model_dir}")
        return 0

    return run


@subcommand("describe", "parameters and multiply-accumulates of the model presets")
def _describe(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--preset", action="append", dest="presets", metavar="NAME",
                   help="preset to describe (repeatable; default: all)")
    p.add_argument("--num-classes", type=_positive, default=1, help="K (default 1)")

    def run(args: argparse.Namespace) -> int:
        from hidiff.config import list_presets, preset
        from hidiff.describe import describe

        names = args.presets or list(list_presets())
        configs = [preset(name, num_classes=args.num_classes) for name in names]
        print("\n\n".join(describe(c) for c in configs))
        return 0

    return run


# -- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hidiff",
        description="HiDiff medical image segmentation: a segmentor proposes a mask, a binarized "
                    "Bernoulli diffusion refiner refines it in a few steps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, define in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=define(p))
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands of packages that build on ``hidiff`` (``export`` adds ``export`` and
    ``verify-export``), registered under the ``hidiff.commands`` entry-point group so that
    ``hidiff`` never imports them (imports point one way: export -> hidiff). One that fails to
    load (a missing or broken dependency of it) is skipped with a warning on stderr, so that it
    cannot take ``hidiff``'s own commands down with it."""
    for ep in sorted(entry_points(group="hidiff.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as err:  # any failure of the plugin or its imports
            print(f"hidiff: warning: the commands of {ep.value} are unavailable "
                  f"({type(err).__name__}: {err})", file=sys.stderr)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def run_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand's handler: user errors print
    ``PROG CMD: error: ...`` and give exit code 2, a diverged training run 1, Ctrl-C 130, no
    traceback."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    keep_freed_memory()  # each iteration / image reuses the pages of the one before
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        print(f"{parser.prog} {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged (TrainingDiverged): not bad input
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C; training: a signal after its checkpoint
        detail = f": {err}" if str(err) else ""
        print(f"{parser.prog} {args.command}: interrupted{detail}", file=sys.stderr)
        return 128 + int(getattr(err, "signum", 2))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hidiff`` command line; returns the exit code."""
    return run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
