"""Run ``refiner_step.tflite`` (``export.lce.export_lce``) with Larq Compute Engine.

    from edge_runtime.lce_backend import LceRefinerStep
    step = LceRefinerStep("exported/refiner_step.tflite", num_threads=1)
    probabilities = step({"image": x, "y_t": y, "prior": p, "feature_0": f0, ..., "step": t})

The call mirrors an onnxruntime session of ``refiner_step.onnx``: the same input names, NCHW
float32 arrays and an int64 ``step`` of shape ``(N,)`` in, ``probabilities`` ``(N, K, H, W)``
out (``run(None, feeds)`` returns ``[probabilities]`` like ``InferenceSession.run``). Inside,
4-D arrays are transposed to the model's NHWC layout and back. The TFLite graph has a fixed
batch size (usually 1); a batch of ``N`` runs in chunks of that size.

Environment: LCE 0.16 (``larq-compute-engine==0.16.0``) needs **numpy < 2** in its process
(with numpy 2 every predict fails with "Expected N bytes but got 0"), so it lives in its own
virtual environment (``requirements-lce.txt``). Its package ``__init__`` imports the converter,
which imports TensorFlow; this module never executes it: it registers a bare package module for
``larq_compute_engine`` (its real ``__path__``, no code run) and imports only
``larq_compute_engine.tflite.python.interpreter``. A later ``import larq_compute_engine`` in the
same process gets that bare module (the interpreter, not the converter).

Kernels (``kernel=``): ``"indirect_bgemm"`` (LCE's indirect BGEMM kernel, single-threaded only;
the fastest on x86), ``"optimized"`` (LCE's default BGEMM), ``"reference"``; ``"auto"`` picks
``indirect_bgemm`` for one thread, else ``optimized``. ``xnnpack=True`` runs the float ops
through TFLite's XNNPACK delegate. LCE's hand-written kernels target aarch64/arm32; on x86 it
runs portable C++.

Never imports torch, hidiff or export.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

__all__ = ["KERNELS", "LceRefinerStep", "LceUnavailable", "lce_available", "load_interpreter"]

KERNELS = ("auto", "indirect_bgemm", "optimized", "reference")
_TFLITE_DTYPES = {0: np.float32, 2: np.int32, 4: np.int64, 6: np.bool_, 9: np.int8}


class LceUnavailable(ImportError):
    """larq-compute-engine cannot be used in this process (missing, or numpy >= 2)."""


def lce_available() -> tuple[bool, str]:
    """(usable, reason): LCE installed and numpy < 2 in this process."""
    if ("larq_compute_engine" not in sys.modules
            and importlib.util.find_spec("larq_compute_engine") is None):
        return False, ("larq-compute-engine is not installed (it lives in the LCE environment: "
                       "pip install -r requirements-lce.txt)")
    major = int(np.__version__.split(".")[0])
    if major >= 2:
        return False, (f"larq-compute-engine 0.16 needs numpy < 2, this process has numpy "
                       f"{np.__version__} (use the LCE environment, requirements-lce.txt)")
    return True, ""


def _package_root() -> str:
    loaded = sys.modules.get("larq_compute_engine")
    if loaded is not None and getattr(loaded, "__path__", None):
        return list(loaded.__path__)[0]
    spec = importlib.util.find_spec("larq_compute_engine")
    if spec is None or not spec.submodule_search_locations:
        raise LceUnavailable(lce_available()[1])
    return list(spec.submodule_search_locations)[0]


def load_interpreter():
    """``larq_compute_engine.tflite.python.interpreter.Interpreter`` without the package
    ``__init__`` (and so without TensorFlow). Raises :class:`LceUnavailable`."""
    ok, reason = lce_available()
    if not ok:
        raise LceUnavailable(reason)
    if "larq_compute_engine" not in sys.modules:
        root = _package_root()
        package = types.ModuleType("larq_compute_engine")
        package.__path__ = [root]
        package.__file__ = str(Path(root) / "__init__.py")
        package.__package__ = "larq_compute_engine"
        sys.modules["larq_compute_engine"] = package
    module = importlib.import_module("larq_compute_engine.tflite.python.interpreter")
    return module.Interpreter


def _schema():
    """The flatbuffers TFLite schema shipped in the LCE wheel (a plain module: loaded by path)."""
    name = "_hidiff_lce_tflite_schema"
    if name not in sys.modules:
        path = Path(_package_root()) / "mlir" / "python" / "tflite_schema.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def read_signature(data: bytes) -> tuple[list[tuple[str, tuple, type]], list[tuple[str, tuple,
                                                                                   type]]]:
    """Inputs and outputs of a TFLite model: (name, stored shape, numpy dtype) in model order."""
    schema = _schema()
    model = schema.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)

    def entry(i):
        t = graph.Tensors(i)
        shape = tuple(int(t.Shape(j)) for j in range(t.ShapeLength()))
        return t.Name().decode(), shape, _TFLITE_DTYPES[t.Type()]

    inputs = [entry(graph.Inputs(k)) for k in range(graph.InputsLength())]
    outputs = [entry(graph.Outputs(k)) for k in range(graph.OutputsLength())]
    return inputs, outputs


class LceRefinerStep:
    """One refiner step in LCE's interpreter; ``__call__(inputs) -> probabilities`` (NCHW)."""

    def __init__(self, path: str | Path, *, num_threads: int = 1, kernel: str = "auto",
                 xnnpack: bool = True) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        if kernel == "auto":
            kernel = "indirect_bgemm" if num_threads == 1 else "optimized"
        if kernel == "indirect_bgemm" and num_threads != 1:
            raise ValueError("LCE's indirect BGEMM kernel is single-threaded: use num_threads=1")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such TFLite model")
        data = self.path.read_bytes()
        if data[4:8] != b"TFL3":
            raise ValueError(f"{self.path}: not a TFLite flatbuffer")
        Interpreter = load_interpreter()
        self.inputs, self.outputs = read_signature(data)
        self.input_names = [name for name, _, _ in self.inputs]
        self.output_names = [name for name, _, _ in self.outputs]
        self.batch = self.inputs[0][1][0] if self.inputs[0][1] else 1
        self.kernel, self.num_threads, self.xnnpack = kernel, num_threads, bool(xnnpack)
        self.interpreter = Interpreter(
            data,
            num_threads=num_threads,
            use_reference_bconv=kernel == "reference",
            use_indirect_bgemm=kernel == "indirect_bgemm",
            use_xnnpack=bool(xnnpack),
        )

    def _prepare(self, inputs: dict[str, np.ndarray]) -> tuple[int, list[np.ndarray]]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"missing inputs {missing}; the model takes {self.input_names}")
        arrays, n = [], None
        for name, stored, dtype in self.inputs:
            a = np.asarray(inputs[name])
            if a.ndim != len(stored):
                raise ValueError(f"input {name!r}: expected {len(stored)} axes, got {a.ndim}")
            if a.ndim == 4:
                a = a.transpose(0, 2, 3, 1)
            if tuple(a.shape[1:]) != tuple(stored[1:]):
                want = stored if len(stored) != 4 else (stored[0], stored[3], *stored[1:3])
                dims = ", ".join(map(str, want[1:]))
                raise ValueError(f"input {name!r}: expected shape (N, {dims}), got "
                                 f"{tuple(np.asarray(inputs[name]).shape)}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"input {name!r}: batch {a.shape[0]} differs from {n}")
            arrays.append(np.ascontiguousarray(a, dtype=dtype))
        if n is None or n % self.batch:
            raise ValueError(f"batch {n} is not a multiple of the model's batch {self.batch}")
        return n, arrays

    def run_all(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every model output (4-D ones back in NCHW), for a batch of any multiple of
        :attr:`batch`."""
        n, arrays = self._prepare(inputs)
        chunks = []
        for start in range(0, n, self.batch):
            part = [a[start:start + self.batch] for a in arrays]
            chunks.append(self.interpreter.interpreter.predict(part))
        outs = [np.concatenate([c[i] for c in chunks]) for i in range(len(self.outputs))]
        return [o.transpose(0, 3, 1, 2) if o.ndim == 4 else o for o in outs]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``probabilities`` (N, K, H, W) float32 for NCHW ``inputs`` keyed by input name."""
        return self.run_all(inputs)[0]

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """onnxruntime-style ``run(None or [names], feeds) -> [arrays]``."""
        outs = dict(zip(self.output_names, self.run_all(feeds), strict=True))
        names = self.output_names if output_names is None else list(output_names)
        return [outs[name] for name in names]

    def __repr__(self) -> str:
        return (f"LceRefinerStep({str(self.path)!r}, kernel={self.kernel!r}, "
                f"num_threads={self.num_threads}, xnnpack={self.xnnpack}, batch={self.batch})")
