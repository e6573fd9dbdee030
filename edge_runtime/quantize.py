"""int8 graphs for an exported model folder (``hidiff-edge quantize``).

    from edge_runtime.quantize import quantize_model
    quantize_model("exported/", images_from=["calibration/"], max_images=32)
    HiDiffSession("exported/", segmentor="int8", refiner_static="int8")

Two parts of an image's real-valued arithmetic run once per image and gain from int8 (x86 VNNI,
ARM dot-product); :func:`quantize_model` adds one graph per part (``parts``):

- ``segmentor``: ``segmentor_int8.onnx``, the segmentor (most of an image's multiply-adds);
- ``refiner_static``: ``refiner_static_int8.onnx``, the binary refiner's per-image part (its
  *static* part, :mod:`edge_runtime.graph`: the convolutions that inject the image and the
  segmentor's features into each level), as the runtime splits it from the rewritten
  ``refiner_step.onnx`` (:mod:`edge_runtime.rewrite`). Its convolutions are quantized except those
  that feed the X-Former (any whose output reaches one of :data:`_ATTENTION_OPS`: its layer norm,
  ``BinaryLinear`` projections, ``MatMul``, ``Softmax``; an 8-bit X-Former projection was 18 %
  off on cpu-base in an earlier measurement). The batch norms are folded into the convolutions
  first (onnxruntime's quantization pre-processing, without its symbolic shape inference, which
  needs sympy).

Each graph comes from onnxruntime's static quantization
(``onnxruntime.quantization.quantize_static``; QDQ format, unsigned 8-bit activations, signed
8-bit per-channel weights, min-max calibration), calibrated on the user's own images exactly as
prediction makes them (:func:`reference.network_inputs`: resized, or cut into tiles, and
normalised; the refiner's part on the fp32 segmentor's outputs for them):

- the graph keeps every ``hidiff.*`` fact of the graph it comes from (so the checks that tie the
  graphs of one training together still hold), with its own ``graph_role`` and a
  ``hidiff.quantization`` record (method, calibration images; for the refiner's part the sha256
  of the ``refiner_step.onnx`` it was made from, the digest of the fp32 part it replaces,
  :func:`edge_runtime.graph.content_digest`, which a runtime splitting the refiner otherwise
  refuses, and how many convolutions are int8 / float);
- the manifest lists it like every other graph (bytes, sha256, signature); every graph asked
  for is made before any is written; each is written under a temporary name and renamed, the
  manifest rewritten the same way, the manifest last;
- the binary layers and the per-step work are untouched: the packed and onnxruntime backends stay
  bit-identical given the same int8 graphs.

int8 values differ from the float ones (about 1 % of the refiner part's outputs, a few per cent
of the prior's range), so masks change a little; ``benchmarks/edge.py --dice-model`` measures the
Dice change on real data. A folder with int8 graphs is read by runtimes that know their roles
(this one and later); earlier ones refuse its manifest's unknown role rather than guess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import reference
from reference.files import atomic_write_bytes

from . import images
from .errors import ModelError
from .export_format import FILES, MANIFEST, META_PREFIX
from .model import ExportedModel, load_model

__all__ = ["INT8_ROLE", "PARTS", "QUANTIZATION", "STATIC_INT8_ROLE", "quantize_model",
           "quantize_segmentor"]

INT8_ROLE = "segmentor_int8"
STATIC_INT8_ROLE = "refiner_static_int8"
#: part -> the role of its int8 graph
PARTS = {"segmentor": INT8_ROLE, "refiner_static": STATIC_INT8_ROLE}
_WHAT = {INT8_ROLE: "an int8 segmentor", STATIC_INT8_ROLE: "an int8 refiner static part"}
#: what ``hidiff.quantization`` records (plus the calibration image count)
QUANTIZATION = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                "activations": "uint8", "weights": "int8 per channel", "calibration": "minmax"}
#: the X-Former's ops: convolutions whose outputs reach one stay float. The static part holds
#: the X-Former's key / value side (layer norm, then ``BinaryLinear`` projections, inlined into
#: ``MatMul`` by the pre-processing); the attention's own ops are listed for graphs that hold it
_ATTENTION_OPS = frozenset({"LayerNormalization", "BinaryLinear", "MatMul", "Softmax"})


def _network_inputs(files: Sequence[Path], facts,
                    progress: Callable[[int, int], None] | None) -> Iterator[np.ndarray]:
    """One (1, C, H, W) network input at a time (the graphs' batch is dynamic)."""
    for done, path in enumerate(files, 1):
        rgb = images.as_float_image(images.read_image(path, facts.in_channels), facts.in_channels)
        x = reference.network_inputs(rgb, facts.preprocessing).astype(np.float32)
        if progress is not None:
            progress(done, len(files))
        for i in range(x.shape[0]):
            yield np.ascontiguousarray(x[i:i + 1])


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


def _quantize(source, feeds: Iterator[dict[str, np.ndarray]], *, blamed: Path, **options):
    """``quantize_static`` of ``source`` (path or proto) on ``feeds``: the int8 proto."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    with tempfile.TemporaryDirectory(prefix="hidiff-quantize-") as tmp, _QuietQuantizer():
        if not isinstance(source, (str, Path)):
            import onnx

            onnx.save(source, str(Path(tmp) / "source.onnx"))
            source = Path(tmp) / "source.onnx"
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_static(str(source), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                            **options)
            # (not CalibMaxIntermediateOutputs: onnxruntime 1.32 then fails with "No data is
            # collected" when the run count is a multiple of it; calibration memory grows with
            # max_images x tiles per image)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime's own errors, named for the user
            raise ModelError(blamed, f"onnxruntime could not quantize this graph "
                                     f"({type(err).__name__}: {err})") from err
        import onnx

        return onnx.load(str(out))


def _segmentor_int8(model: ExportedModel, files: Sequence[Path], progress):
    feeds = ({"image": x} for x in _network_inputs(files, model.facts, progress))
    proto = _quantize(model.files["segmentor"], feeds, blamed=model.files["segmentor"])
    return proto, model.protos["segmentor"], {}, _signature_entry(proto)


def _signature_entry(proto) -> dict:
    """The manifest's ``inputs`` / ``outputs`` of ``proto`` (as ``hidiff export`` writes them)."""
    import onnx

    def values(infos):
        out = []
        for v in infos:
            t = v.type.tensor_type
            out.append({"name": v.name,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": [d.dim_param if d.dim_param else int(d.dim_value)
                                  for d in t.shape.dim]})
        return out

    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                     if n.domain not in ("", "ai.onnx")})
    return {"inputs": values(proto.graph.input), "outputs": values(proto.graph.output),
            "custom_ops": custom}


def _attention_inputs(graph) -> set[str]:
    """Values from which the X-Former (a node in :data:`_ATTENTION_OPS`) can be reached."""
    producer = {o: n for n in graph.node for o in n.output}
    todo = [i for n in graph.node if n.op_type in _ATTENTION_OPS for i in n.input]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None:
            todo.extend(node.input)
    return seen


def _unique_names(graph) -> None:
    """Name every node of ``graph`` uniquely (quantize_static selects nodes by name; inlined
    functions leave nodes unnamed or named alike)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)


def static_part(proto):
    """The static part of the binary refiner ``proto`` as the runtime splits it (rewritten by
    :mod:`edge_runtime.rewrite`, then :func:`edge_runtime.graph.split_refiner`)."""
    from .graph import split_refiner
    from .rewrite import rewrite_refiner

    return split_refiner(rewrite_refiner(proto)[0]).static


def _refiner_static_int8(model: ExportedModel, files: Sequence[Path], progress):
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .graph import content_digest
    from .ortutil import make_session

    refiner_file = model.files["refiner_step"]
    with tempfile.TemporaryDirectory(prefix="hidiff-quantize-") as tmp, _QuietQuantizer():
        try:
            part = static_part(model.protos["refiner_step"])
            if part.model is None:
                raise ModelError(refiner_file, "this refiner has no per-image part to quantize")
            digest = content_digest(part.model)
            source, folded = Path(tmp) / "static.onnx", Path(tmp) / "folded.onnx"
            onnx.save(part.model, str(source))  # (given a proto, it moves its weights out)
            quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
            proto = onnx.load(str(folded))
            segmentor = make_session(model.files["segmentor"], 1)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - onnx / onnxruntime errors, named for the user
            raise ModelError(refiner_file, f"cannot prepare its per-image part for quantization "
                                           f"({type(err).__name__}: {err})") from err
        _unique_names(proto.graph)
        attention = _attention_inputs(proto.graph)
        convs = [n for n in proto.graph.node if n.op_type == "Conv"]
        chosen = [n.name for n in convs if n.output[0] not in attention]
        if not chosen:
            raise ModelError(refiner_file, "the refiner's per-image part has no convolution "
                                           "outside the X-Former to quantize")
        onnx.save(proto, str(folded))
        names = [o.name for o in segmentor.get_outputs()]

        def feeds():
            for x in _network_inputs(files, model.facts, progress):
                values = {"image": x, **dict(zip(names, segmentor.run(names, {"image": x}),
                                                 strict=True))}
                yield {n: values[n] for n in part.inputs}

        proto = _quantize(folded, feeds(), blamed=refiner_file, op_types_to_quantize=["Conv"],
                          nodes_to_quantize=chosen)
    refiner_sha = next(e["sha256"] for e in model.manifest["files"]
                       if e.get("role") == "refiner_step")
    extra = {"refiner_sha256": refiner_sha, "static_part_sha256": digest,
             "convolutions": len(chosen), "float_convolutions": len(convs) - len(chosen)}
    return proto, model.protos["refiner_step"], extra, {**_signature_entry(proto),
                                                        "refiner_sha256": refiner_sha}


_MAKERS = {INT8_ROLE: _segmentor_int8, STATIC_INT8_ROLE: _refiner_static_int8}


def _write(model: ExportedModel, made: list[tuple[str, Any, Any, dict, dict]]) -> list[Path]:
    """Add each ``(role, proto, source, record, entry)`` of ``made`` to the folder (module
    docstring: metadata, manifest, order); on any failure the folder is as it was."""
    folder = model.folder
    manifest = json.loads((folder / MANIFEST).read_text())
    datas: dict[str, bytes] = {}
    for role, proto, source, record, entry in made:
        meta = {p.key: p.value for p in source.metadata_props}
        meta[META_PREFIX + "graph_role"] = role
        meta[META_PREFIX + "quantization"] = json.dumps(record, sort_keys=True)
        del proto.metadata_props[:]
        for key, value in sorted(meta.items()):
            proto.metadata_props.add(key=key, value=value)
        datas[role] = data = proto.SerializeToString(deterministic=True)
        entry = dict(entry, role=role, name=FILES[role], bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), quantization=record)
        manifest["files"] = [e for e in manifest["files"] if e.get("role") != role] + [entry]
    old = {role: (folder / FILES[role]).read_bytes() if (folder / FILES[role]).is_file()
           else None for role in datas}
    try:
        for role, data in datas.items():
            atomic_write_bytes(folder / FILES[role], data)
        atomic_write_bytes(folder / MANIFEST,
                           (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    except BaseException as err:
        # the manifest still lists what it listed: put the graphs it lists back
        for role, data in old.items():
            if data is None:
                (folder / FILES[role]).unlink(missing_ok=True)
            else:
                atomic_write_bytes(folder / FILES[role], data)
        if isinstance(err, OSError):
            raise ModelError(folder, f"cannot write the int8 graphs ({err})") from err
        raise
    return [folder / FILES[role] for role in datas]


def quantize_model(
    model_dir: str | Path,
    *,
    images_from: Sequence[str | Path] | str | Path,
    parts: Sequence[str] = tuple(PARTS),
    max_images: int = 32,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Path]:
    """Add the int8 graphs of ``parts`` to the export folder ``model_dir`` (module docstring).

    Args:
        model_dir: a folder written by ``hidiff export``.
        images_from: images or folders of images to calibrate on (the first ``max_images`` in
            natural order); images like the ones the model will see.
        parts: any of ``"segmentor"``, ``"refiner_static"`` (default both), made in that order.
        max_images: how many images calibrate (>= 1).
        overwrite: replace int8 graphs the manifest lists (a file the manifest does not list
            is a leftover and always replaced).
        progress: called as ``progress(part, done, total)`` after each calibration image is
            read.

    Returns the paths of the new graphs. Raises ``ModelError`` / ``ValueError`` /
    ``InputError`` for a bad folder, no images, an unreadable image, a graph onnxruntime cannot
    quantize or a listed int8 graph without ``overwrite``; every graph is made before any is
    written, so on any error the folder is as it was.
    """
    from .cli_io import collect_images

    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be an int >= 1; got {max_images!r}")
    asked = (parts,) if isinstance(parts, str) else tuple(parts)
    if not asked or any(p not in PARTS for p in asked) or isinstance(parts, str):
        raise ValueError(f"parts must be a non-empty sequence of {', '.join(PARTS)}; "
                         f"got {parts!r}")
    if isinstance(images_from, (str, Path)):
        images_from = [images_from]
    parts = [p for p in PARTS if p in asked]
    roles = [PARTS[p] for p in parts]
    model = load_model(model_dir, roles=("segmentor", "refiner_step") if STATIC_INT8_ROLE in roles
                       else ("segmentor",))
    listed = {e.get("role") for e in model.manifest["files"]}
    for role in roles:
        if role in listed and not overwrite:
            raise ValueError(f"{model.folder / FILES[role]}: this model already has "
                             f"{_WHAT[role]}; pass --overwrite to replace it")
    files = collect_images([Path(p) for p in images_from], unique_stems=False)[:max_images]
    for path in files:  # decode every calibration image before the (slow) calibration
        images.read_image(path, model.facts.in_channels)
    made = []
    for part, role in zip(parts, roles, strict=True):
        step = None if progress is None else (lambda d, t, p=part: progress(p, d, t))
        proto, source, extra, entry = _MAKERS[role](model, files, step)
        record = dict(QUANTIZATION, calibration_images=len(files), **extra)
        made.append((role, proto, source, record, entry))
    return _write(model, made)


def quantize_segmentor(model_dir: str | Path, *, images_from: Sequence[str | Path],
                       max_images: int = 32, overwrite: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """:func:`quantize_model` of the segmentor alone (``progress(done, total)``)."""
    step = None if progress is None else (lambda part, d, t: progress(d, t))
    return quantize_model(model_dir, images_from=images_from, parts=("segmentor",),
                          max_images=max_images, overwrite=overwrite, progress=step)[0]
