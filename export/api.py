"""``export_model_dir``: a trained model folder -> ONNX files + ``manifest.json``.

Output folder::

    segmentor.onnx          image -> prior, feature_0 .. feature_{m-1}
    refiner_step.onnx       image, y_t, prior, feature_0 .., step -> probabilities  (binary refiner)
    refiner_step_fp.onnx    the same for the full-precision twin (when the folder has one)
    manifest.json           the model facts, every file with role, bytes, sha256, signature

What the export folds (see :mod:`export.convert`): the step-embedding MLP and every Linear of its
output become per-step tables gathered by ``step``; each batch norm that directly follows a binary
conv is folded into that conv's per-channel scale and bias; the sign of a time-dependent
binarization that feeds a binary layer is done by the binary node. The legacy torch exporter
additionally folds the batch norms that directly follow real convs into them and constant-folds
the rest. Binary layers are ``ai.hidiff`` custom nodes with +-1 weights (:mod:`export.ops`).

Everything is first written to a temporary folder beside ``out_dir`` and checked; then the files
are moved in with ``os.replace`` (the old manifest removed first, the new one last). A failure
while exporting or checking leaves ``out_dir`` as it was; one during the final moves (a full disk,
say) can leave new graphs without a manifest, which every reader refuses. With ``--target lce`` the
TFLite file is written after the ONNX files, atomically on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from edge_runtime.export_format import DOMAIN, FILES, MANIFEST
from export.convert import ConversionReport, check_equivalent, prepare_refiner
from export.graphs import RefinerStepGraph, SegmentorGraph, refiner_feature_indices, to_onnx
from export.loading import ExportError, VerificationFailed, load_model
from export.metadata import (
    CUSTOM_OPS_DOC,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    file_entry,
    graph_metadata,
    model_facts,
)
from export.verify import verify_export
from export.versions import MIN_IR, SUPPORTED_IR_VERSIONS, SUPPORTED_OPSETS

__all__ = [
    "MANIFEST",
    "ROLES",
    "SUPPORTED_IR_VERSIONS",
    "SUPPORTED_OPSETS",
    "ExportError",
    "ExportResult",
    "VerificationFailed",
    "export_model_dir",
    "load_model",
]

_MIN_IR = MIN_IR
ROLES = FILES  # role -> file name (edge_runtime.export_format)
#: the export-ready refiner copy may differ from the original by float rounding (BN folding,
#: table rows evaluated in one batch); a wrong replacement changes most outputs. Fail when more
#: than this fraction of logits differ by more than ``_EQUIV_RTOL * max(1, max|logits|)``.
_EQUIV_RTOL = 1e-3
_EQUIV_MAX_FRACTION = 0.01


@dataclass
class ExportResult:
    """What :func:`export_model_dir` wrote."""

    out_dir: Path
    files: dict[str, Path]  # role -> path
    manifest: dict[str, Any]
    conversions: dict[str, ConversionReport] = field(default_factory=dict)
    verification: Any = None  # export.verify.VerifyReport when verify=True

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    def sizes(self) -> dict[str, int]:
        return {role: path.stat().st_size for role, path in self.files.items()}


def check_request(opset: int, ir_version: int) -> None:
    """Raise ``ValueError`` listing the supported values for an unsupported opset / IR version.

    Opsets 17-20: ``LayerNormalization`` needs 17, the legacy torch exporter stops at 20.
    IR versions 8-10, at least the one the opset needs (opset 19/20: 9); onnx 1.23 would write
    14 by default, which onnxruntime 1.31 refuses.
    """
    if isinstance(opset, bool) or opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"unsupported opset {opset!r}; supported: {', '.join(map(str, SUPPORTED_OPSETS))}"
        )
    allowed = tuple(v for v in SUPPORTED_IR_VERSIONS if v >= _MIN_IR[opset])
    if isinstance(ir_version, bool) or ir_version not in allowed:
        raise ExportError(
            f"unsupported ir_version {ir_version!r} for opset {opset}; supported: "
            f"{', '.join(map(str, allowed))}"
        )


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: output folder is a file; pass a folder path")
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"{parent}: parent of the output folder is a file")
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"{existing}: folder is not writable; choose another output folder")


def example_inputs(loaded, batch: int = 2, seed: int = 0) -> tuple:
    """Seeded tracing inputs: (image, y_t, prior, features, t) from the model's segmentor."""
    config = loaded.config
    g = torch.Generator().manual_seed(seed)
    size = config.image_size
    image = torch.randn(batch, config.in_channels, size, size, generator=g)
    with torch.no_grad():
        out = loaded.segmentor(image)
        prior = loaded.segmentor.prior_from_logits(out.logits)
    y_t = (torch.rand(prior.shape, generator=g) < prior).float()
    t = torch.full((batch,), config.diffusion.num_steps, dtype=torch.long)
    return image, y_t, prior, tuple(out.features), t


def _export_refiner(loaded, refiner, role, inputs, names, opset, ir_version, facts):
    image, y_t, prior, features, t = inputs
    num_steps = loaded.config.diffusion.num_steps
    ready, report = prepare_refiner(refiner, inputs, num_steps)
    frac, worst = check_equivalent(refiner, ready, inputs, sorted({1, num_steps}),
                                   rtol=_EQUIV_RTOL)
    if frac > _EQUIV_MAX_FRACTION:
        raise ExportError(
            f"{role}: the export-ready refiner differs from the original in {frac:.1%} of the "
            f"logits (max {worst:.3g}); a replaced module does not match the refiner's data flow"
        )
    report.max_abs_diff = worst
    indices = refiner_feature_indices(refiner)
    graph = RefinerStepGraph(ready, indices, len(features))
    feature_names = [f"feature_{i}" for i in range(len(indices))]
    input_names = ["image", "y_t", "prior", *feature_names, "step"]
    custom = sorted({f"{DOMAIN}::{c}" for c in report.custom_ops()})
    meta = graph_metadata(facts, role=role, inputs=input_names, outputs=names,
                          custom_ops=custom, folded=report.summary())
    args = (image, y_t, prior, *(features[j] for j in indices), t)
    model = to_onnx(graph, args, input_names=input_names, output_names=names, opset=opset,
                    ir_version=ir_version, metadata=meta)
    return model, report


def build_models(loaded, *, opset: int, ir_version: int):
    """The ONNX models of a loaded model folder: ``{role: (ModelProto, report or None)}``."""
    inputs = example_inputs(loaded)
    indices = refiner_feature_indices(loaded.refiner)
    strides = [loaded.segmentor.feature_strides[j] for j in indices]
    facts = model_facts(loaded, strides)
    feature_names = [f"feature_{i}" for i in range(len(indices))]
    seg_outputs = ["prior", *feature_names]
    seg_meta = graph_metadata(facts, role="segmentor", inputs=["image"], outputs=seg_outputs)
    models: dict[str, tuple[onnx.ModelProto, ConversionReport | None]] = {}
    seg = to_onnx(SegmentorGraph(loaded.segmentor, indices), (inputs[0],), input_names=["image"],
                  output_names=seg_outputs, opset=opset, ir_version=ir_version, metadata=seg_meta)
    models["segmentor"] = (seg, None)
    refiners = [("refiner_step", loaded.refiner), ("refiner_step_fp", loaded.refiner_fp)]
    for role, refiner in refiners:
        if refiner is None:
            continue
        if refiner_feature_indices(refiner) != indices:
            raise ExportError(f"{role}: reads other segmentor features than the binary refiner")
        models[role] = _export_refiner(loaded, refiner, role, inputs, ["probabilities"], opset,
                                       ir_version, facts)
    return models, facts


def export_model_dir(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = 17,
    ir_version: int = 10,
    verify: bool = False,
) -> ExportResult:
    """Export a trained model folder to ONNX (see the module docstring for the layout).

    Args:
        model_dir: a folder written by ``hidiff train`` (``checkpoint.pt``, ``config.json``, ...).
        out_dir: the output folder (created; files of the same names are replaced).
        opset: default-domain opset, one of :data:`SUPPORTED_OPSETS`.
        ir_version: the files' IR version, one of :data:`SUPPORTED_IR_VERSIONS`.
        verify: also run every graph in onnxruntime against the torch model
            (:func:`export.verify.verify_export`, random inputs) and fail above tolerance.

    Raises:
        ExportError (a ``ValueError``): unsupported opset / IR version (listing the supported
        ones), a model folder without checkpoint or with bad files, an output path that is a
        file, a failed check. Nothing is written to ``out_dir`` then.
    """
    check_request(opset, ir_version)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    loaded = load_model(model_dir)
    models, facts = build_models(loaded, opset=opset, ir_version=ir_version)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        entries = []
        for role, (model, _) in models.items():
            path = tmp / ROLES[role]
            path.write_bytes(model.SerializeToString(deterministic=True))
            entries.append(file_entry(path, model, role))
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "opset": opset,
            "ir_version": ir_version,
            "custom_domain": {"domain": DOMAIN, "ops": CUSTOM_OPS_DOC},
            "model": facts,
            "files": entries,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        report = None
        if verify:
            report = verify_export(tmp, model=loaded)
            if not report.passed:
                raise VerificationFailed(report)
        files = _move_into(tmp, out_dir, [ROLES[r] for r in models])
        if report is not None:
            report.out_dir = out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        out_dir=out_dir,
        files={role: files[ROLES[role]] for role in models},
        manifest=manifest,
        conversions={role: rep for role, (_, rep) in models.items() if rep is not None},
        verification=report,
    )


def _move_into(tmp: Path, out_dir: Path, names: list[str]) -> dict[str, Path]:
    """Move the checked files from ``tmp`` into ``out_dir`` (manifest last, stale roles removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = manifest = out_dir / MANIFEST
    if stale.exists():  # the old manifest goes first: never a manifest naming missing files
        stale.unlink()
    for name in ROLES.values():
        if name not in names and (out_dir / name).exists():
            (out_dir / name).unlink()
        # an older `--target lce` artifact no longer matches the new graphs
        for lce in (Path(name).with_suffix(".tflite"), Path(name).with_suffix(".lce.json")):
            if (out_dir / lce).exists():
                (out_dir / lce).unlink()
    moved = {}
    for name in names:
        os.replace(tmp / name, out_dir / name)
        moved[name] = out_dir / name
    os.replace(tmp / MANIFEST, manifest)
    return moved
