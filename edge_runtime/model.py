"""Reading and checking an exported model folder (``export_model_dir``'s output).

A folder holds ``manifest.json`` and the graphs ``segmentor.onnx``, ``refiner_step.onnx``,
(optionally) ``refiner_step_fp.onnx`` and (added by ``hidiff-edge quantize``)
``segmentor_int8.onnx`` and ``refiner_static_int8.onnx``. Every ``.onnx`` file carries the
model facts in its ``metadata_props`` (``hidiff.*`` keys, JSON values except plain strings).
:func:`load_model` refuses, with a :class:`~edge_runtime.errors.ModelError` naming the file:

- a missing folder, manifest or graph; a manifest that is not JSON or not a hidiff export;
- an unknown ``format`` / ``format_version`` (manifest or graph);
- a file that does not decode as ONNX (truncated, foreign bytes) or lacks the hidiff metadata
  (a foreign model), or whose ``graph_role`` is not the role it is listed under;
- two graphs (or a graph and the manifest) that disagree on a model fact, e.g. T, K or the input
  size; a refiner whose inputs do not match the segmentor's outputs; an int8 refiner static
  part made from another ``refiner_step.onnx`` or reading inputs the refiner does not have;
- a file whose size or sha256 differs from the manifest's record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reference

from .errors import ModelError
from .export_format import (
    FACT_KEYS,
    FILES,
    FORMAT,
    MANIFEST,
    META_PREFIX,
    SUPPORTED_FORMAT_VERSIONS,
)

__all__ = [
    "FACT_KEYS",
    "FORMAT",
    "MANIFEST",
    "ROLES",
    "SUPPORTED_FORMAT_VERSIONS",
    "ExportedModel",
    "ModelFacts",
    "load_model",
    "read_metadata",
]

ROLES = FILES  # role -> file name
_MISSING = {"refiner_step_fp": "no full-precision twin graph",
            "segmentor_int8": "no int8 segmentor graph; make one with hidiff-edge quantize",
            "refiner_static_int8": "no int8 refiner static part; make one with hidiff-edge "
                                   "quantize"}
_FACT_WORDS = {"num_steps": "T (num_steps)", "num_classes": "K (num_classes)",
               "input_size": "the input size"}


@dataclass(frozen=True)
class ModelFacts:
    """The model facts the runtime needs (from the manifest, checked against every graph)."""

    schedule: str
    num_steps: int
    sampler: str
    sampling_steps: int
    timesteps: tuple[int, ...]
    parameterization: str
    offset: str
    sampling_samples: int
    sampling_estimate: str
    num_classes: int
    labels: dict[str, int]
    input_size: tuple[int, int]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    policy: str
    tile: int
    overlap: int
    binarization: str
    feature_strides: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def preprocessing(self) -> reference.Preprocessing:
        """The preprocessing facts as :func:`reference.predict_image` takes them."""
        tiled = self.policy == "tile"
        return reference.Preprocessing(
            policy=self.policy, mean=self.mean, std=self.std,
            input_size=None if tiled else self.input_size,
            tile=self.tile if tiled else 0, overlap=self.overlap if tiled else 0)

    @classmethod
    def from_dict(cls, facts: dict[str, Any], where: Path) -> ModelFacts:
        try:
            pre = facts["preprocessing"]
            norm = facts["normalization"]
            out = cls(
                schedule=str(facts["schedule"]), num_steps=int(facts["num_steps"]),
                sampler=str(facts["sampler"]), sampling_steps=int(facts["sampling_steps"]),
                timesteps=tuple(int(t) for t in facts["timesteps"]),
                parameterization=str(facts["parameterization"]),
                # absent from exports made before they existed: the plain form, one chain,
                # each chain's last estimate
                offset=reference.check_offset(str(facts.get("offset", "none"))),
                sampling_samples=int(facts.get("sampling_samples", 1)),
                sampling_estimate=reference.check_estimate(
                    str(facts.get("sampling_estimate", "last"))),
                num_classes=int(facts["num_classes"]),
                labels={str(k): int(v) for k, v in facts["labels"].items()},
                input_size=(int(facts["input_size"][0]), int(facts["input_size"][1])),
                in_channels=int(facts["in_channels"]),
                mean=tuple(float(v) for v in norm["mean"]),
                std=tuple(float(v) for v in norm["std"]),
                policy=str(pre["policy"]), tile=int(pre.get("tile") or 0),
                overlap=int(pre.get("overlap") or 0),
                binarization=str(facts["binarization"]),
                feature_strides=tuple(int(s) for s in facts["feature_strides"]),
                raw=dict(facts),
            )
            out.preprocessing  # noqa: B018 -- checks policy, normalisation and tile facts
            return out
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ModelError(where, f"malformed model facts ({type(err).__name__}: {err})"
                             ) from err


@dataclass
class ExportedModel:
    """A checked export folder: the facts, the manifest, and each graph's file and proto."""

    folder: Path
    manifest: dict[str, Any]
    facts: ModelFacts
    files: dict[str, Path]
    protos: dict[str, Any]  # role -> onnx.ModelProto
    metadata: dict[str, dict[str, Any]]

    def sizes(self) -> dict[str, int]:
        return {role: path.stat().st_size for role, path in self.files.items()}


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_metadata(proto) -> dict[str, Any]:
    """``hidiff.*`` metadata of a ModelProto, values parsed (JSON where it parses)."""
    return {p.key[len(META_PREFIX):]: _parse_value(p.value) for p in proto.metadata_props
            if p.key.startswith(META_PREFIX)}


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        what = "is a file, not a model folder" if folder.exists() else "no such model folder"
        raise ModelError(folder, what)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelError(path, "missing: not an exported hidiff model folder (run hidiff export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(path, f"unreadable manifest ({type(err).__name__}: {err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(path, f"not a hidiff ONNX export manifest (format must be {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelError(path, f"unsupported format_version {version!r}; this runtime reads "
                               f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}")
    if not isinstance(manifest.get("model"), dict) or not isinstance(manifest.get("files"), list):
        raise ModelError(path, "malformed manifest (no 'model' facts or 'files' list)")
    return manifest


def _load_proto(path: Path, role: str):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ModelError(path, f"missing {role} graph listed in the manifest")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as err:
        raise ModelError(path, f"not a readable ONNX model (truncated or corrupt: "
                               f"{type(err).__name__}: {err})") from err
    if len(proto.graph.node) == 0:
        raise ModelError(path, "not a readable ONNX model (empty graph; truncated or corrupt)")
    return proto


def _check_graph_meta(path: Path, role: str, meta: dict[str, Any], recorded: Any) -> None:
    if "format_version" not in meta:
        size = path.stat().st_size
        note = "" if recorded == size else f"; {size} bytes, the manifest records {recorded}"
        raise ModelError(path, f"not a hidiff export graph: no hidiff.format_version metadata "
                               f"(a foreign or truncated ONNX file{note})")
    if meta["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelError(path, f"unsupported hidiff.format_version {meta['format_version']!r}; "
                               f"this runtime reads "
                               f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}")
    if meta.get("graph_role") != role:
        raise ModelError(path, f"graph_role is {meta.get('graph_role')!r}, expected {role!r}")


def _check_facts(files: dict[str, Path], metas: dict[str, dict[str, Any]],
                 manifest_facts: dict[str, Any], manifest_path: Path) -> None:
    first_role = next(iter(metas))
    for key in FACT_KEYS:
        word = _FACT_WORDS.get(key, key)
        ref_role, ref = first_role, metas[first_role].get(key)
        for role, meta in metas.items():
            if meta.get(key) != ref:
                raise ModelError(files[role], f"graphs disagree on {word}: {meta.get(key)!r} here "
                                              f"but {ref!r} in {files[ref_role].name}")
        if manifest_facts.get(key) != ref:
            raise ModelError(files[first_role], f"{word} is {ref!r} but {manifest_path.name} "
                                                f"says {manifest_facts.get(key)!r}")


def _io_names(values) -> list[str]:
    return [v.name for v in values]


def _check_signatures(files: dict[str, Path], protos: dict[str, Any], facts: ModelFacts) -> None:
    seg = protos["segmentor"]
    seg_in, seg_out = _io_names(seg.graph.input), _io_names(seg.graph.output)
    if seg_in != ["image"] or not seg_out or seg_out[0] != "prior":
        raise ModelError(files["segmentor"], f"unexpected segmentor signature {seg_in} -> "
                                             f"{seg_out} (expected image -> prior, features)")
    features = seg_out[1:]
    if "segmentor_int8" in protos:
        q = protos["segmentor_int8"].graph
        if (_io_names(q.input), _io_names(q.output)) != (seg_in, seg_out):
            raise ModelError(files["segmentor_int8"], f"int8 segmentor signature "
                                                      f"{_io_names(q.input)} -> "
                                                      f"{_io_names(q.output)} differs from the "
                                                      f"segmentor's {seg_in} -> {seg_out}")
    for role in ("refiner_step", "refiner_step_fp"):
        if role not in protos:
            continue
        names = _io_names(protos[role].graph.input)
        expected = ["image", "y_t", "prior", *names[3:-1], "step"]
        if names != expected or any(f not in features for f in names[3:-1]):
            raise ModelError(files[role], f"refiner inputs {names} do not match the segmentor "
                                          f"outputs {seg_out} (expected image, y_t, prior, "
                                          f"features..., step)")
        if len(protos[role].graph.output) != 1:
            raise ModelError(files[role], "the refiner step must have exactly one output")
    if "refiner_static_int8" in protos:
        names = _io_names(protos["refiner_static_int8"].graph.input)
        allowed = [n for n in _io_names(protos["refiner_step"].graph.input)
                   if n not in ("y_t", "step")] if "refiner_step" in protos else names
        if not names or any(n not in allowed for n in names):
            raise ModelError(files["refiner_static_int8"], f"inputs {names} are not among the "
                                                           f"refiner's per-image inputs {allowed}")
    prior_dims = [d.dim_value for d in seg.graph.output[0].type.tensor_type.shape.dim]
    want = [facts.num_classes, *facts.input_size]
    if len(prior_dims) == 4 and prior_dims[1:] != want:
        raise ModelError(files["segmentor"], f"prior shape {prior_dims[1:]} disagrees with "
                                             f"K and the input size {want}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(folder: str | Path, *, roles: tuple[str, ...] | None = None,
               verify_hashes: bool = True) -> ExportedModel:
    """Read and check an export folder (see the module docstring). ``roles``: the graphs to
    load (default: every graph the manifest lists); the segmentor is always loaded."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    manifest_path = folder / MANIFEST
    entries: dict[str, dict[str, Any]] = {}
    for entry in manifest["files"]:
        role = entry.get("role") if isinstance(entry, dict) else None
        if role not in ROLES:
            raise ModelError(manifest_path, f"unknown graph role {role!r} in 'files'")
        if entry.get("name") != ROLES[role]:
            raise ModelError(manifest_path, f"role {role} must be the file {ROLES[role]}")
        entries[role] = entry
    for needed in ("segmentor", "refiner_step"):
        if needed not in entries:
            raise ModelError(manifest_path, f"no {needed} graph listed")
    wanted = list(entries) if roles is None else ["segmentor"] + [
        r for r in roles if r != "segmentor"]
    for role in wanted:
        if role not in entries:
            what = _MISSING.get(role, f"no {role} graph")
            raise ModelError(folder, f"this model has {what} ({ROLES[role]})")
    files = {role: folder / ROLES[role] for role in wanted}
    if "refiner_static_int8" in wanted and (entries["refiner_static_int8"].get("refiner_sha256")
                                            != entries["refiner_step"].get("sha256")):
        raise ModelError(files["refiner_static_int8"], "made from another refiner_step.onnx than "
                                                       "this folder's; run hidiff-edge quantize "
                                                       "--overwrite again")
    protos = {role: _load_proto(files[role], role) for role in wanted}
    metas = {role: read_metadata(protos[role]) for role in wanted}
    for role in wanted:
        _check_graph_meta(files[role], role, metas[role], entries[role].get("bytes"))
    _check_facts(files, metas, manifest["model"], manifest_path)
    facts = ModelFacts.from_dict(manifest["model"], manifest_path)
    _check_signatures(files, protos, facts)
    if verify_hashes:
        for role in wanted:
            entry, path = entries[role], files[role]
            if entry.get("bytes") != path.stat().st_size:
                raise ModelError(path, f"{path.stat().st_size} bytes but the manifest records "
                                       f"{entry.get('bytes')} (truncated or replaced file)")
            if entry.get("sha256") and _sha256(path) != entry["sha256"]:
                raise ModelError(path, "sha256 differs from the manifest's (modified file)")
    return ExportedModel(folder, manifest, facts, files, protos, metas)
