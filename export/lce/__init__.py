"""Larq Compute Engine (LCE) target: ``refiner_step.onnx`` -> ``refiner_step.tflite``.

    from export.lce import export_lce
    path = export_lce("runs/kvasir", "exported/")  # model folder, ONNX folder or .onnx file

The binary layers become LCE custom ops (``LceQuantize`` + ``LceBconv2d``), everything else
builtin TFLite ops in NHWC; run the file with :class:`edge_runtime.lce_backend.LceRefinerStep`
(in the LCE environment, ``requirements-lce.txt``).

Modules: :mod:`~export.lce.api` (``export_lce``), :mod:`~export.lce.analyze` (static facts of
the ONNX graph), :mod:`~export.lce.translate`, :mod:`~export.lce.layers` and
:mod:`~export.lce.patterns` (op by op), :mod:`~export.lce.layout` (NCHW -> NHWC bookkeeping),
:mod:`~export.lce.binary_ops` (the LCE binary ops), :mod:`~export.lce.tflite_writer` (the
flatbuffer writer), :mod:`~export.lce.cli` (``--target lce``, ``python -m export.lce``).
``binary_ops`` and ``tflite_writer`` need only numpy and flatbuffers.
"""

from typing import TYPE_CHECKING

from export.lazy import lazy_names

if TYPE_CHECKING:  # loaded on first use (the command line's definitions need none of them)
    from .analyze import TranslationError
    from .api import FORMAT, FORMAT_VERSION, export_lce, signature_path, translate_onnx
    from .translate import OP_MAPPING

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "OP_MAPPING",
    "TranslationError",
    "export_lce",
    "signature_path",
    "translate_onnx",
]

__getattr__ = lazy_names(__name__, globals(), {
    "TranslationError": f"{__name__}.analyze", "OP_MAPPING": f"{__name__}.translate",
    **{name: f"{__name__}.api" for name in
       ("FORMAT", "FORMAT_VERSION", "export_lce", "signature_path", "translate_onnx")}})
