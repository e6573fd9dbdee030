"""The facts an exported folder carries: ``metadata_props`` of each file and ``manifest.json``.

Every ``.onnx`` file holds the model facts under namespaced keys (``hidiff.*``, all values
strings, JSON where structured) so a single file is self-describing; ``manifest.json`` repeats
them once for the folder and lists every file with its role, size, sha256 and signature.

Keys (see :func:`model_facts` and :func:`graph_metadata`):

===========================  ==================================================================
``hidiff.format_version``    version of this export format (:data:`EXPORT_FORMAT_VERSION`)
``hidiff.graph_role``        ``segmentor`` | ``refiner_step`` | ``refiner_step_fp``
``hidiff.schedule``          noise schedule name (method §2)
``hidiff.num_steps``         T
``hidiff.sampler``           ``ddim`` | ``ancestral``
``hidiff.sampling_steps``    number of reverse steps the model samples with by default
``hidiff.timesteps``         JSON: those original steps, decreasing (what ``step`` is fed)
``hidiff.parameterization``  ``eps`` (y0_hat = abs(y_t - out)) | ``y0`` (out is y0_hat)
``hidiff.offset``            ``bayes`` (out is combined with E[target | y_t, p], see
                             ``reference.estimate``) | ``none``; absent in older exports: none
``hidiff.sampling_samples``  S, chains averaged per image by default (absent: 1)
``hidiff.sampling_estimate`` each chain's estimate: ``last`` (its final y0_hat) | ``trajectory``
                             (the mean of its steps' y0_hat); absent in older exports: last
``hidiff.num_classes``       K (1 = binary task: sigmoid prior; > 1: softmax prior, one-hot y_t)
``hidiff.labels``            JSON: label name -> value
``hidiff.input_size``        JSON: [H, W] of every image input
``hidiff.in_channels``       image channels
``hidiff.normalization``     JSON: {"mean": [...], "std": [...]} applied to the [0, 1] image
``hidiff.preprocessing``     JSON: the dataset's policy (resize | tile), size, tile, overlap
``hidiff.binarization``      e.g. ``sign(0)=+1;pack=lce-int32-lsb;bit1=-1;pad=+1``
``hidiff.feature_strides``   JSON: stride of each ``feature_i``
``hidiff.inputs`` / ``hidiff.outputs``  JSON: the graph's input / output names in order
``hidiff.step_input``        refiner graphs: how ``step`` is fed
``hidiff.output_kind``       ``probabilities``
``hidiff.custom_ops``        JSON: custom ops used (domain::name)
``hidiff.folded``            JSON: what the export folded (refiner graphs)
``hidiff.source_commit``     commit of the code that trained the model (``unknown`` if none)
``hidiff.training_step``     training iterations of the checkpoint
``hidiff.model_id``          sha256 of the checkpoint file the graphs come from: every graph of
                             one export carries the same one (a reader refuses a mix)
``hidiff.dataset``           dataset name
===========================  ==================================================================

Nothing here depends on time or paths, so the same checkpoint exports to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

import reference
from edge_runtime.export_format import (
    BINARY_CONV,
    BINARY_LINEAR,
    DOMAIN,
    DOMAIN_VERSION,
    FORMAT,
    FORMAT_VERSION,
    META_PREFIX,
)
from hidiff.model_dir import CHECKPOINT

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "binarization_string",
    "file_entry",
    "graph_metadata",
    "model_facts",
    "sha256_file",
]

EXPORT_FORMAT = FORMAT
EXPORT_FORMAT_VERSION = FORMAT_VERSION

STEP_INPUT_DOC = (
    "int64 tensor of shape (N,): the ORIGINAL step index t of each sample (0..T; the sampler "
    "feeds 1..T); it selects rows of the folded per-step tables"
)

CUSTOM_OPS_DOC = {
    f"{DOMAIN}::{BINARY_CONV}": {
        "version": DOMAIN_VERSION,
        "inputs": ["X (float NCHW, not binarized)", "W (+-1 float OIHW)", "scale (C_out,)",
                   "bias (C_out,)"],
        "attributes": ["kernel_shape", "strides", "dilations", "pads [top, left, bottom, right]",
                       "pad_value (float)", "channels_in", "channels_out"],
        "semantics": "Y = conv(pad(sign(X), pad_value), W) * scale + bias, "
                     "sign(x) = -1 if x < 0 else +1",
    },
    f"{DOMAIN}::{BINARY_LINEAR}": {
        "version": DOMAIN_VERSION,
        "inputs": ["X (float, features last)", "W (+-1 float (C_out, C_in))", "scale (C_out,)",
                   "bias (C_out,)"],
        "attributes": ["channels_in", "channels_out"],
        "semantics": "Y = sign(X) @ W^T * scale + bias, sign(x) = -1 if x < 0 else +1",
    },
}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def binarization_string(pad_value: float) -> str:
    """The binarization conventions as one string (method §7)."""
    pad = "+1" if float(pad_value) == 1.0 else "0"
    return f"sign(0)=+1;pack=lce-int32-lsb;bit1=-1;pad={pad}"


def model_facts(loaded: Any, feature_strides: Sequence[int]) -> dict[str, Any]:
    """The facts shared by every graph of one model (JSON-ready values).

    ``loaded`` is a :class:`hidiff.training.LoadedModel`.
    """
    config = loaded.config
    info = loaded.dataset_info
    diffusion = config.diffusion
    n = diffusion.num_sampling_steps
    steps = reference.spaced_steps(diffusion.num_steps, n)
    commit = (loaded.header or {}).get("commit") or "unknown"
    return {
        "schedule": diffusion.schedule,
        "num_steps": diffusion.num_steps,
        "sampler": diffusion.sampler,
        "sampling_steps": n,
        "timesteps": [int(s) for s in reversed(list(steps))],
        "parameterization": config.refiner.parameterization,
        "offset": config.refiner.offset,
        "sampling_samples": diffusion.sampling_samples,
        "sampling_estimate": diffusion.sampling_estimate,
        "num_classes": config.num_classes,
        "labels": dict(info.labels),
        "input_size": [config.image_size, config.image_size],
        "in_channels": config.in_channels,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "preprocessing": {"policy": info.policy, "size": info.size, "tile": info.tile,
                          "overlap": info.overlap},
        "binarization": binarization_string(config.refiner.pad_value),
        "feature_strides": [int(s) for s in feature_strides],
        "source_commit": str(commit),
        "training_step": int(loaded.step),
        "model_id": sha256_file(Path(loaded.path) / CHECKPOINT),
        "dataset": info.name,
        "preset": config.preset,
    }


def graph_metadata(
    facts: Mapping[str, Any],
    *,
    role: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    custom_ops: Sequence[str] = (),
    folded: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """``metadata_props`` of one graph: the model facts plus the graph's own, namespaced."""
    meta: dict[str, Any] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "graph_role": role,
        **facts,
        "inputs": list(inputs),
        "outputs": list(outputs),
        "output_kind": "probabilities",
        "custom_ops": sorted(custom_ops),
    }
    if "step" in inputs:
        meta["step_input"] = STEP_INPUT_DOC
    if folded is not None:
        meta["folded"] = dict(folded)
    return {
        f"{META_PREFIX}{k}": v if isinstance(v, str) else _json(v)
        for k, v in sorted(meta.items())
    }


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _signature(values) -> list[dict[str, Any]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": shape})
    return out


def file_entry(path: Path, model: onnx.ModelProto, role: str) -> dict[str, Any]:
    """The manifest's entry for one written ``.onnx`` file."""
    return {
        "name": path.name,
        "role": role,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "inputs": _signature(model.graph.input),
        "outputs": _signature(model.graph.output),
        "custom_ops": sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                              if n.domain == DOMAIN}),
    }
