"""Torch-free edge runtime of hidiff (numpy, onnx, onnxruntime and the native ``_packed`` kernels).

    from edge_runtime import HiDiffSession
    session = HiDiffSession("exported/", backend="packed", threads=1)
    prediction = session.predict(image, steps=None, seed=0)

Modules: :mod:`~edge_runtime.session` (``HiDiffSession``), :mod:`~edge_runtime.model` (reading
and checking an export folder), :mod:`~edge_runtime.graph` (static / step / dynamic split),
:mod:`~edge_runtime.refiner` (the split refiner step), :mod:`~edge_runtime.rewrite`
(cheaper equivalents of its real-valued layers), :mod:`~edge_runtime.plan` and
:mod:`~edge_runtime.executor` (the packed backend), :mod:`~edge_runtime.packed` (the native
XNOR-popcount kernel), :mod:`~edge_runtime.images` (image I/O and preprocessing),
:mod:`~edge_runtime.cli` (``hidiff-edge``). Never imports torch, hidiff or export.
"""

from .errors import EdgeError, InputError, ModelError
from .session import BACKENDS, EdgePrediction, HiDiffSession, default_backend

__all__ = [
    "BACKENDS",
    "EdgeError",
    "EdgePrediction",
    "HiDiffSession",
    "InputError",
    "ModelError",
    "default_backend",
]
