"""The verification gate tells a wrong export from rounding-induced sign flips.

Probabilities are judged per case (one sample at one step): flips of binarized activations that
sit within rounding of 0 change a minority of cases, a wrong export changes every case. This test
corrupts one folded BinaryConv scale in an otherwise valid export (manifest hashes updated so only
the numbers are wrong) and requires the gate to fail on every case.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

from export import verify_export
from export.metadata import sha256_file


def test_corrupted_binary_scale_fails_every_case(tiny_export, tiny_model_dir, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(tiny_export.out_dir, out)
    path = out / "refiner_step.onnx"
    model = onnx.load(str(path))
    scales = {n.input[2] for n in model.graph.node if n.op_type == "BinaryConv"}
    target = next(i for i in model.graph.initializer if i.name in scales)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.5, target.name))
    onnx.save(model, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["name"] == path.name:
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))

    good = verify_export(tiny_export.out_dir, model=tiny_model_dir)
    bad = verify_export(out, model=tiny_model_dir)
    assert good.passed, good.format()
    assert not bad.problems, bad.problems  # integrity is fine: only the numbers are wrong
    (cmp,) = [c for c in bad.comparisons if c.graph == "refiner_step" and c.against == "torch"]
    assert not cmp.passed and cmp.cases_over == cmp.cases > 0, bad.format()
    assert np.isfinite(cmp.max_abs_diff)
