"""ONNX export of a trained HiDiff model folder, and parity checks.

    from export import export_model_dir, verify_export

    result = export_model_dir("runs/kvasir", "exported/", verify=True)
    report = verify_export("exported/", model="runs/kvasir", data="../shared/data/Kvasir-SEG")

Files: ``segmentor.onnx``, ``refiner_step.onnx`` (one binarized refiner step, binary layers as
``ai.hidiff::BinaryConv`` / ``ai.hidiff::BinaryLinear`` nodes with model-local function bodies),
``refiner_step_fp.onnx`` (the full-precision twin, when trained) and ``manifest.json``.
Modules: :mod:`export.api` (the entry point), :mod:`export.ops` (custom ops), :mod:`export.modules`
and :mod:`export.convert` (the export-ready refiner copy), :mod:`export.graphs` (torch -> ONNX),
:mod:`export.metadata` (metadata and manifest), :mod:`export.verify`, :mod:`export.cli`.
``export`` imports ``hidiff``; ``hidiff`` never imports ``export``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from export.lazy import lazy_names

if TYPE_CHECKING:  # the names below load on first use: `hidiff --help` need not import onnx
    from export.api import (
        MANIFEST,
        ROLES,
        SUPPORTED_IR_VERSIONS,
        SUPPORTED_OPSETS,
        ExportError,
        ExportResult,
        VerificationFailed,
        export_model_dir,
    )
    from export.verify import VerifyReport, verify_export

__all__ = [
    "MANIFEST",
    "ROLES",
    "SUPPORTED_IR_VERSIONS",
    "SUPPORTED_OPSETS",
    "ExportError",
    "ExportResult",
    "VerificationFailed",
    "VerifyReport",
    "export_model_dir",
    "verify_export",
]

__getattr__ = lazy_names(__name__, globals(), {
    name: "export.verify" if name in ("VerifyReport", "verify_export") else "export.api"
    for name in __all__})
