"""The exported format, defined once: what ``hidiff export`` writes and the edge runtime reads.

The reader side owns it (it must stay torch-free); the writer (``export``) imports it.

- a folder with :data:`MANIFEST` and one ONNX file per role (:data:`FILES`);
- the manifest's ``format`` is :data:`FORMAT`, ``format_version`` :data:`FORMAT_VERSION`
  (readers accept :data:`SUPPORTED_FORMAT_VERSIONS`);
- every file's ``metadata_props`` hold the model facts under :data:`META_PREFIX` keys (values are
  strings, JSON where structured); :data:`FACT_KEYS` are the facts every graph and the manifest
  must agree on (the table in ``export.metadata`` documents each key);
- the binary layers are custom ops :data:`BINARY_CONV` / :data:`BINARY_LINEAR` in domain
  :data:`DOMAIN` (version :data:`DOMAIN_VERSION`), padding with one of :data:`PAD_VALUES`.
"""

from __future__ import annotations

import reference

__all__ = [
    "BINARY_CONV", "BINARY_LINEAR", "DOMAIN", "DOMAIN_VERSION", "FACT_KEYS", "FILES", "FORMAT",
    "FORMAT_VERSION", "MANIFEST", "META_PREFIX", "PAD_VALUES", "SUPPORTED_FORMAT_VERSIONS",
]

FORMAT = "hidiff-onnx"
#: the version ``hidiff export`` writes
FORMAT_VERSION = 1
#: the versions the edge runtime reads
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
#: graph role -> file name in the export folder
FILES = {
    "segmentor": "segmentor.onnx",
    "refiner_step": "refiner_step.onnx",
    "refiner_step_fp": "refiner_step_fp.onnx",
    # added to an export by ``hidiff-edge quantize`` (edge_runtime.quantize), never by export
    "segmentor_int8": "segmentor_int8.onnx",
    "refiner_static_int8": "refiner_static_int8.onnx",
}
#: namespace of the ONNX ``metadata_props`` keys
META_PREFIX = "hidiff."
#: facts every graph and the manifest must agree on
FACT_KEYS = (
    "schedule", "num_steps", "sampler", "sampling_steps", "timesteps", "parameterization",
    "offset", "sampling_samples", "sampling_estimate", "num_classes", "labels", "input_size",
    "in_channels", "normalization", "preprocessing",
    "binarization", "feature_strides", "model_id",
)
#: custom-op domain of the binary layers, its version and op names
DOMAIN = "ai.hidiff"
DOMAIN_VERSION = 1
BINARY_CONV = "BinaryConv"
BINARY_LINEAR = "BinaryLinear"
#: the padding values a binary convolution may use (the reference's)
PAD_VALUES = reference.ALLOWED_PAD_VALUES
