"""onnxruntime helpers: sessions with a fixed thread count, and a fast NHWC <-> NCHW transpose.

Every session of the runtime is made by :func:`make_session` (CPU provider, ``threads`` intra-op
threads, one inter-op thread, all graph optimisations). All of them share one CPU memory arena
registered with the ORT environment: the packed backend runs a dozen small sessions per step,
and one arena each would keep the sum of their peaks (measured: 570 MiB instead of 300 MiB peak
RSS for the cpu-base model). ORT's ``Transpose`` kernel moves a
256 x 256 x 32 float tensor between NHWC and NCHW about three times faster than a NumPy copy, so
:func:`to_nchw` / :func:`to_nhwc` use one small cached session per permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["make_session", "session_options", "to_nchw", "to_nhwc"]

_PROVIDERS = ["CPUExecutionProvider"]


_SHARED_ARENA: bool | None = None


def _shared_arena() -> bool:
    """Register one CPU arena allocator with the ORT environment (once per process)."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _SHARED_ARENA = True
        except Exception:  # noqa: BLE001 - an ORT without it: per-session arenas
            _SHARED_ARENA = False
    return _SHARED_ARENA


def session_options(threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if _shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # no spinning: between the pieces of a packed step the native kernels run their own threads
    # on the same cores, and spinning ORT workers took them (measured: 2 threads 4x slower)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def make_session(model: Any, threads: int = 1) -> ort.InferenceSession:
    """A CPU session of ``model`` (a path, serialized bytes or an ``onnx.ModelProto``)."""
    if isinstance(model, Path):
        model = str(model)
    elif hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, session_options(threads), providers=_PROVIDERS)


_TRANSPOSES: dict[tuple[tuple[int, ...], int], ort.InferenceSession] = {}


def _transpose_session(perm: tuple[int, ...], threads: int) -> ort.InferenceSession:
    session = _TRANSPOSES.get((perm, threads))
    if session is None:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Transpose", ["x"], ["y"], perm=list(perm))], "transpose",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * len(perm))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(perm))],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        session = _TRANSPOSES[perm, threads] = make_session(model, threads)
    return session


def _transpose(x: np.ndarray, perm: tuple[int, ...], threads: int) -> np.ndarray:
    if x.dtype != np.float32 or x.size < 4096:
        return np.ascontiguousarray(x.transpose(perm))
    return _transpose_session(perm, threads).run(None, {"x": np.ascontiguousarray(x)})[0]


def to_nchw(x: np.ndarray, threads: int = 1) -> np.ndarray:
    """NHWC -> contiguous NCHW."""
    return _transpose(x, (0, 3, 1, 2), threads)


def to_nhwc(x: np.ndarray, threads: int = 1) -> np.ndarray:
    """NCHW -> contiguous NHWC."""
    return _transpose(x, (0, 2, 3, 1), threads)
