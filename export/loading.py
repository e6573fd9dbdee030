"""Loading a trained model folder for export and verification, and the export's error type."""

from __future__ import annotations

from pathlib import Path

from hidiff.model_dir import load_model_dir

__all__ = ["ExportError", "VerificationFailed", "load_model"]


class ExportError(ValueError):
    """A bad export request (arguments, model folder, output folder) or a failed check."""


class VerificationFailed(ExportError):
    """``export_model_dir(verify=True)``: the graphs differ from the torch model beyond the
    tolerances (nothing was written); ``report`` is the :class:`export.VerifyReport`."""

    def __init__(self, report) -> None:
        self.report = report
        super().__init__(f"verification failed:\n{report.format()}")


def load_model(model_dir: str | Path):
    """The model folder as a :class:`hidiff.training.LoadedModel` (eval mode, CPU).

    A missing folder, ``checkpoint.pt`` or header file raises :class:`ExportError`.
    """
    path = Path(model_dir)
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise ExportError(f"{path}: {what}")
    if not (path / "checkpoint.pt").is_file():
        raise ExportError(f"{path}: no checkpoint.pt in the model folder (train first)")
    try:
        return load_model_dir(path, map_location="cpu")
    except ValueError as err:  # ModelDirError
        raise ExportError(str(err)) from err
