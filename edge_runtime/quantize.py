"""An int8 segmentor for an exported model folder (``hidiff-edge quantize``).

    from edge_runtime.quantize import quantize_segmentor
    quantize_segmentor("exported/", images_from=["calibration/"], max_images=32)
    HiDiffSession("exported/", segmentor="int8")

The segmentor runs once per image and is most of an image's real-valued arithmetic, so it is the
graph where int8 pays (x86 VNNI, ARM dot-product). :func:`quantize_segmentor` runs onnxruntime's
static quantization (``onnxruntime.quantization.quantize_static``; QDQ format, unsigned 8-bit
activations, signed 8-bit per-channel weights, min-max calibration) on ``segmentor.onnx`` with
calibration batches made from the user's own images exactly as prediction makes them
(:func:`reference.network_inputs`: resized, or cut into tiles, and normalised), and adds the
result to the folder as ``segmentor_int8.onnx``:

- the graph keeps every ``hidiff.*`` fact of the float segmentor (so the checks that tie the
  graphs of one training together still hold), with ``graph_role`` ``segmentor_int8`` and a
  ``hidiff.quantization`` record (method, calibration images);
- the manifest lists it like every other graph (bytes, sha256, signature); the file is written
  under a temporary name and renamed, the manifest rewritten the same way, the manifest last;
- the refiners are untouched: the binary refiner's 1-bit layers gain nothing from int8, and the
  packed and onnxruntime backends stay bit-identical given the same segmentor outputs.

The int8 prior and features differ from the float ones (a few per cent of the prior's range), so
masks change a little; ``benchmarks/edge.py --dice-model`` measures the Dice change on real data.
A folder with an int8 segmentor is read by runtimes that know the role (this one and later);
earlier ones refuse its manifest's unknown role rather than guess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import reference
from reference.files import atomic_write_bytes

from . import images
from .errors import ModelError
from .export_format import FILES, MANIFEST, META_PREFIX
from .model import load_model

__all__ = ["INT8_ROLE", "QUANTIZATION", "quantize_segmentor"]

INT8_ROLE = "segmentor_int8"
#: what ``hidiff.quantization`` records (plus the calibration image count)
QUANTIZATION = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                "activations": "uint8", "weights": "int8 per channel", "calibration": "minmax"}


def _calibration_batches(files: Sequence[Path], facts,
                         progress: Callable[[int, int], None] | None):
    for done, path in enumerate(files, 1):
        rgb = images.as_float_image(images.read_image(path, facts.in_channels), facts.in_channels)
        x = reference.network_inputs(rgb, facts.preprocessing).astype(np.float32)
        if progress is not None:
            progress(done, len(files))
        for i in range(x.shape[0]):  # one network input at a time: the graph's batch is dynamic
            yield {"image": np.ascontiguousarray(x[i:i + 1])}


class _QuietQuantizer(logging.Filter):
    """Drops onnxruntime.quantization's advice (run its pre-processing: symbolic shape inference,
    which needs sympy, not an edge dependency), logged through the root logger; installed on
    the root logger for the call only, with a ``NullHandler`` where the root has no handler so
    that ``logging.warning`` does not configure logging for the whole process."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return not ("onnxruntime/" in path and "/quantization/" in path)

    def __enter__(self):
        root = logging.getLogger()
        self._null = logging.NullHandler() if not root.handlers else None
        if self._null is not None:
            root.addHandler(self._null)
        root.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        root.removeFilter(self)
        if self._null is not None:
            root.removeHandler(self._null)


def quantize_segmentor(
    model_dir: str | Path,
    *,
    images_from: Sequence[str | Path],
    max_images: int = 32,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Add ``segmentor_int8.onnx`` to the export folder ``model_dir`` (module docstring).

    Args:
        model_dir: a folder written by ``hidiff export``.
        images_from: images or folders of images to calibrate on (the first ``max_images`` in
            natural order); images like the ones the model will see.
        max_images: how many images calibrate (>= 1).
        overwrite: replace the int8 segmentor the manifest lists (a ``segmentor_int8.onnx`` the
            manifest does not list is a leftover and always replaced).
        progress: called as ``progress(done, total)`` after each calibration image is read.

    Returns the path of the new graph. Raises ``ModelError`` / ``ValueError`` (the folder as it
    was) for a bad folder, no images, an unreadable image, a graph onnxruntime cannot quantize
    or a listed int8 graph without ``overwrite``.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from .cli_io import collect_images

    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be an int >= 1; got {max_images!r}")
    model = load_model(model_dir, roles=("segmentor",))
    folder, facts = model.folder, model.facts
    target = folder / FILES[INT8_ROLE]
    if any(e.get("role") == INT8_ROLE for e in model.manifest["files"]) and not overwrite:
        raise ValueError(f"{target}: this model already has an int8 segmentor; pass "
                         f"--overwrite to replace it")
    files = collect_images([Path(p) for p in images_from], unique_stems=False)[:max_images]
    for path in files:  # decode every calibration image before the (slow) calibration
        images.read_image(path, facts.in_channels)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(_calibration_batches(files, facts, progress))

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="hidiff-quantize-") as tmp, _QuietQuantizer():
        out = Path(tmp) / target.name
        try:
            quantize_static(str(model.files["segmentor"]), str(out), _Reader(),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax)
            # (not CalibMaxIntermediateOutputs: onnxruntime 1.32 then fails with "No data is
            # collected" when the run count is a multiple of it; calibration memory grows with
            # max_images x tiles per image)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime's own errors, named for the user
            raise ModelError(model.files["segmentor"], f"onnxruntime could not quantize this "
                                                       f"graph ({type(err).__name__}: {err})"
                             ) from err
        import onnx

        proto = onnx.load(str(out))
    record = dict(QUANTIZATION, calibration_images=len(files))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta[META_PREFIX + "graph_role"] = INT8_ROLE
    meta[META_PREFIX + "quantization"] = json.dumps(record, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString(deterministic=True)

    seg_entry = next(e for e in model.manifest["files"] if e.get("role") == "segmentor")
    manifest = dict(model.manifest)
    entry = {k: v for k, v in seg_entry.items() if k in ("inputs", "outputs", "custom_ops")}
    entry.update(role=INT8_ROLE, name=target.name, bytes=len(data),
                 sha256=hashlib.sha256(data).hexdigest(), quantization=record)
    manifest["files"] = [e for e in manifest["files"] if e.get("role") != INT8_ROLE] + [entry]
    old = target.read_bytes() if target.is_file() else None
    try:
        atomic_write_bytes(target, data)
        atomic_write_bytes(folder / MANIFEST,
                           (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    except BaseException as err:
        # the manifest still lists what it listed: put the graph it lists back
        if old is None:
            target.unlink(missing_ok=True)
        else:
            atomic_write_bytes(target, old)
        if isinstance(err, OSError):
            raise ModelError(folder, f"cannot write the int8 segmentor ({err})") from err
        raise
    return target
