"""The LCE exporter's translation in the MAIN environment (torch, onnx; no LCE needed).

What the exported graph *computes* is checked in LCE's interpreter by test_lce_bconv.py and
test_lce_refiner.py (LCE environment); here: which ops it emits (binary layers as LCE ops with
the stride-2 padding made explicit, ONNX transposes absorbed by the layout bookkeeping), the
layout planner, and the error paths.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the exporter (package export) needs the main environment")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.lce import TranslationError, export_lce, translate_onnx  # noqa: E402
from export.lce.cli import main as lce_main  # noqa: E402
from export.lce.layout import NCHW_TO_NHWC, reshape_plan  # noqa: E402
from export.ops import DOMAIN, custom_functions  # noqa: E402


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.functions.extend(custom_functions(17, ["BinaryConv", "BinaryLinear"]))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _binary_model() -> onnx.ModelProto:
    """x -> BinaryConv(3x3, stride 2, pad 1) -> tokens (Reshape + Transpose) -> BinaryLinear
    -> + table[step] -> Sigmoid, with the K/V-style shared input of two BinaryLinears."""
    rng = np.random.default_rng(0)
    sign = lambda *s: np.where(rng.random(s) < 0.5, -1.0, 1.0).astype(np.float32)  # noqa: E731
    inits = {
        "w": sign(16, 8, 3, 3), "s": rng.uniform(0.5, 1, 16).astype(np.float32),
        "b": np.zeros(16, np.float32), "wl": sign(8, 16), "wl2": sign(8, 16),
        "sl": np.ones(8, np.float32), "bl": np.zeros(8, np.float32),
        "tokens": np.array([1, 16, 64], np.int64),
        "table": rng.standard_normal((11, 8)).astype(np.float32),
        "axis1": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("BinaryConv", ["x", "w", "s", "b"], ["c"], domain=DOMAIN,
                         kernel_shape=[3, 3], strides=[2, 2], dilations=[1, 1],
                         pads=[1, 1, 1, 1], pad_value=1.0, channels_in=8, channels_out=16),
        helper.make_node("Reshape", ["c", "tokens"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("BinaryLinear", ["t", "wl", "sl", "bl"], ["k"], domain=DOMAIN,
                         channels_in=16, channels_out=8),
        helper.make_node("BinaryLinear", ["t", "wl2", "sl", "bl"], ["v"], domain=DOMAIN,
                         channels_in=16, channels_out=8),
        helper.make_node("Gather", ["table", "step"], ["a"], axis=0),
        helper.make_node("Unsqueeze", ["a", "axis1"], ["a1"]),
        helper.make_node("Add", ["k", "v"], ["kv"]),
        helper.make_node("Add", ["kv", "a1"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16]),
              helper.make_tensor_value_info("step", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8])]
    return _model(nodes, inputs, outputs, inits)


def test_reshape_plan_keeps_token_round_trip_free():
    assert reshape_plan((1, 32, 8, 8), NCHW_TO_NHWC, (1, 32, 64)) == ((1, 64, 32), (0, 2, 1))
    assert reshape_plan((1, 32, 64), (0, 2, 1), (1, 32, 8, 8)) == ((1, 8, 8, 32), NCHW_TO_NHWC)
    assert reshape_plan((1, 8), (0, 1), (1, 8, 1, 1)) == ((1, 8, 1, 1), (0, 1, 2, 3))
    assert reshape_plan((1, 4, 8, 8), NCHW_TO_NHWC, (1, 32, 8)) is None  # C, H not adjacent


def test_binary_layers_become_lce_ops():
    data, counts, facts = translate_onnx(_binary_model())
    assert data[4:8] == b"TFL3"
    assert counts["LceBconv2d"] == 3
    assert counts["LceQuantize"] == 2  # the two BinaryLinears share one quantize
    assert counts["PAD"] == 1  # stride 2 with symmetric padding: explicit PAD, VALID
    assert counts["GATHER"] == 1
    assert "TRANSPOSE" not in counts  # NHWC -> tokens is a reshape of the storage
    assert facts.shapes["y"] == (1, 64, 8)


def test_unsupported_op_is_named():
    nodes = [helper.make_node("Erf", ["x"], ["y"])]  # a lone Erf (not the GELU pattern)
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], {})
    with pytest.raises(TranslationError, match="ai.onnx::Erf"):
        translate_onnx(model)


def test_export_lce_writes_files_and_cli_errors(tmp_path, capsys):
    onnx_path = tmp_path / "refiner_step.onnx"
    onnx.save(_binary_model(), str(onnx_path))
    out = export_lce(onnx_path, tmp_path / "out", batch=2)
    assert out.name == "refiner_step.tflite" and out.read_bytes()[4:8] == b"TFL3"
    assert (tmp_path / "out" / "refiner_step.lce.json").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".lce-")]
    assert lce_main([str(tmp_path), "-o", str(tmp_path / "cli")]) == 0
    assert "LceBconv2d 3" in capsys.readouterr().out
    assert lce_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch"):
        export_lce(onnx_path, tmp_path / "out", batch=0)
