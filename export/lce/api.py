"""``export_lce``: a model folder or an ONNX export -> ``refiner_step.tflite`` for LCE.

Output folder::

    refiner_step.tflite      LCE/TFLite flatbuffer, batch fixed (default 1), NHWC inputs/outputs
    refiner_step.lce.json    signature (names, NCHW shapes, dtypes, layouts), op counts, source

The file is written to a temporary name beside its destination, then moved in with
``os.replace``: a failure leaves the folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx

from .analyze import analyze
from .binary_ops import NEGATIVE_ZERO_NOTE
from .translate import translate

__all__ = ["FORMAT", "FORMAT_VERSION", "export_lce", "find_onnx", "signature_path",
           "translate_onnx"]

FORMAT = "hidiff-lce"
FORMAT_VERSION = 1
ROLES = ("refiner_step", "refiner_step_fp")


def signature_path(tflite_path: str | Path) -> Path:
    p = Path(tflite_path)
    return p.with_name(p.name.removesuffix(".tflite") + ".lce.json")


def find_onnx(source: str | Path, role: str = "refiner_step", work_dir: Path | None = None
              ) -> Path:
    """The ONNX file of ``role`` for ``source``: a ``.onnx`` file, an export folder holding
    ``{role}.onnx``, or a model folder (``hidiff train`` output: exported to ``work_dir``)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if not path.is_dir():
        what = "is not an .onnx file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{path}: {what} (pass a model folder, an ONNX export folder "
                                "or an .onnx file)")
    if (path / f"{role}.onnx").is_file():
        return path / f"{role}.onnx"
    if (path / "checkpoint.pt").is_file():
        if work_dir is None:
            raise ValueError("a model folder needs a work_dir for its ONNX export")
        from export.api import export_model_dir

        result = export_model_dir(path, work_dir)
        if role not in result.files:
            raise ValueError(f"{path}: the model folder has no {role} network")
        return result.files[role]
    raise FileNotFoundError(f"{path}: neither {role}.onnx nor checkpoint.pt found")


def translate_onnx(model: onnx.ModelProto | str | Path, *, batch: int = 1,
                   canonical_zero: bool = True):
    """(flatbuffer bytes, op counts, GraphFacts) for one ONNX refiner step."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    facts = analyze(model, batch)
    description = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                              "layout": "NHWC"}, sort_keys=True)
    data, counts = translate(facts, canonical_zero=canonical_zero, description=description)
    return data, counts, facts


def export_lce(source: str | Path, out_dir: str | Path, *, batch: int = 1,
               role: str = "refiner_step", canonical_zero: bool = True) -> Path:
    """Write ``{role}.tflite`` (+ ``{role}.lce.json``) for ``source`` into ``out_dir``.

    ``source``: a model folder, an ONNX export folder or an ``.onnx`` file. ``batch``: the fixed
    batch size of the TFLite graph (the LCE backend runs larger batches sample by sample).
    ``canonical_zero``: add +0.0 before each ``LceQuantize`` (see
    :data:`export.lce.binary_ops.NEGATIVE_ZERO_NOTE`). Returns the ``.tflite`` path.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output folder is a file")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lce-", dir=out) as tmp:
        onnx_path = find_onnx(source, role, Path(tmp) / "onnx")
        data, counts, facts = translate_onnx(onnx_path, batch=batch,
                                             canonical_zero=canonical_zero)
        signature = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "role": role,
            "batch": batch,
            "source_onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "tflite_sha256": hashlib.sha256(data).hexdigest(),
            "inputs": [_io_entry(facts, n) for n in facts.inputs],
            "outputs": [_io_entry(facts, n) for n in facts.outputs],
            "op_counts": dict(sorted(counts.items())),
            "canonical_zero": canonical_zero,
            "notes": [NEGATIVE_ZERO_NOTE],
        }
        target = out / f"{role}.tflite"
        staged = Path(tmp) / target.name
        staged.write_bytes(data)
        staged_sig = Path(tmp) / signature_path(target).name
        staged_sig.write_text(json.dumps(signature, indent=2) + "\n")
        os.replace(staged, target)
        os.replace(staged_sig, signature_path(target))
    return target


def _io_entry(facts, name: str) -> dict:
    shape = list(facts.shapes[name])
    return {"name": name, "shape": shape, "dtype": facts.dtypes[name].name,
            "layout": "NHWC" if len(shape) == 4 else "plain"}
