"""The custom ops on single nodes and small hand-made modules.

Binary layers are integer arithmetic followed by ``* scale + bias``: a single exported node run by
onnxruntime (every optimisation level) and by ``onnx.reference.ReferenceEvaluator`` must equal
``reference.binary_conv2d`` / ``reference.binary_linear`` times the scale plus the bias EXACTLY
(the same two float32 operations on the same integers).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import reference
from export.convert import prepare_refiner
from export.graphs import to_onnx
from export.modules import ExportBinaryConv, fold_batch_norm
from export.ops import DOMAIN, BinaryConvFunction, custom_functions
from hidiff.blocks import BasicBlock, DownBlock
from hidiff.embedding import StepEmbedding
from hidiff.layers import BinaryConv2d

LEVELS = (
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
)


def _bipolar(rng, shape):
    return np.where(rng.standard_normal(shape) < 0, -1.0, 1.0).astype(np.float32)


def _single_node_model(op, inputs, attrs, x_shape, y_shape, initializers):
    node = helper.make_node(op, ["X", "W", "scale", "bias"], ["Y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "single", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
        functions=custom_functions(17, [op]),
    )
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def _run_everywhere(model, x):
    outs = []
    for level in LEVELS:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {"X": x})[0])
    outs.append(ReferenceEvaluator(model).run(None, {"X": x})[0])
    return outs


@pytest.mark.parametrize("pad_value", [1.0, 0.0])
@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 1, 0)])
def test_binary_conv_node_is_exact(pad_value, stride, dilation, padding):
    rng = np.random.default_rng(stride * 10 + dilation + padding)
    c, o, h = 37, 5, 9  # 37 channels: more than one 32-bit word in the packed oracle
    x = rng.standard_normal((2, c, h, h)).astype(np.float32)
    x[0, :3, 0, :] = 0.0  # sign(0) = +1
    x[1, :3, 1, :] = -0.0
    w = _bipolar(rng, (o, c, 3, 3))
    scale = rng.random(o).astype(np.float32) + 0.1
    bias = rng.standard_normal(o).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], strides=[stride] * 2, dilations=[dilation] * 2,
                 pads=[padding] * 4, pad_value=pad_value, channels_in=c, channels_out=o)
    ho = reference.conv_output_size(h, 3, stride, padding, dilation)
    model = _single_node_model("BinaryConv", None, attrs, ["N", c, h, h], ["N", o, ho, ho],
                               {"W": w, "scale": scale, "bias": bias})
    ints = reference.binary_conv2d(x, w, stride=stride, padding=padding, dilation=dilation,
                                   pad_value=pad_value)
    expected = ints * scale[:, None, None] + bias[:, None, None]
    for got in _run_everywhere(model, x):
        np.testing.assert_array_equal(got, expected)
    # the torch side of the node computes the same
    with torch.no_grad():
        got = BinaryConvFunction.apply(
            torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(scale),
            torch.from_numpy(bias), [3, 3], [stride] * 2, [dilation] * 2, [padding] * 4,
            pad_value,
        )
    np.testing.assert_array_equal(got.numpy(), expected)


def test_binary_linear_node_is_exact():
    rng = np.random.default_rng(3)
    c, o = 70, 6
    x = rng.standard_normal((2, 11, c)).astype(np.float32)
    x[0, 0, :5] = 0.0
    w = _bipolar(rng, (o, c))
    scale = rng.random(o).astype(np.float32) + 0.1
    bias = rng.standard_normal(o).astype(np.float32)
    model = _single_node_model("BinaryLinear", None, dict(channels_in=c, channels_out=o),
                               ["N", 11, c], ["N", 11, o], {"W": w, "scale": scale, "bias": bias})
    expected = reference.binary_linear(x, w) * scale + bias
    for got in _run_everywhere(model, x):
        np.testing.assert_array_equal(got, expected)


def test_function_bodies_use_no_sign_op():
    for fn in custom_functions(17, ["BinaryConv", "BinaryLinear"]):
        ops = {n.op_type for n in fn.node}
        assert "Sign" not in ops
        assert {"Less", "Where"} <= ops


def test_export_conv_matches_hidiff_layer_with_folded_batch_norm():
    torch.manual_seed(0)
    conv = BinaryConv2d(6, 4, 3, stride=2, padding=1, pad_value=1.0).eval()
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.3)
        bn.bias.normal_(0, 0.3)
    x = torch.randn(2, 6, 8, 8)
    exported = ExportBinaryConv(conv, bn)
    assert set(exported.weight.unique().tolist()) <= {-1.0, 1.0}
    with torch.no_grad():
        torch.testing.assert_close(exported(x), bn(conv(x)), rtol=1e-6, atol=1e-5)
    s, b = fold_batch_norm(torch.ones(4), torch.zeros(4), bn)
    with torch.no_grad():
        torch.testing.assert_close(bn(torch.zeros(1, 4, 1, 1)).view(-1), b, atol=1e-6, rtol=0)


class _TwoBlocks(nn.Module):
    """A hand-made step-conditioned binary net: embedding, basic block, down block."""

    def __init__(self):
        super().__init__()
        self.embed = StepEmbedding(16, 8)
        self.block = BasicBlock(8, 16, binary=True)
        self.down = DownBlock(8, 12, 16, binary=True)

    def forward(self, x, t):
        emb = self.embed(t)
        return self.down(self.block(x, emb), emb)


def test_small_module_conversion_and_onnx_parity(randomize):
    torch.manual_seed(1)
    net = randomize(_TwoBlocks(), seed=5)
    x = torch.randn(2, 8, 16, 16)
    t = torch.tensor([3, 7])
    ready, report = prepare_refiner(net, (x, t), num_steps=10)
    assert len(report.binary_convs) == 2 and len(report.folded_batch_norms) == 2
    # TB thresholds, TA zeta/gamma of two blocks: 6 tables; both TB signs moved into the nodes
    assert len(report.step_tables) == 6 and len(report.signs_in_binary_nodes) == 2
    model = to_onnx(ready, (x, t), input_names=["x", "step"], output_names=["y"], opset=17,
                    ir_version=10, metadata={"hidiff.test": "1"})
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BinaryConv") == 2 and "Sign" not in ops
    assert not {"Sin", "Cos"} & set(ops)  # the embedding MLP is gone: tables only
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps in ([0, 10], [1, 1], [10, 4]):
        step = torch.tensor(steps)
        with torch.no_grad():
            expected = net(x, step).numpy()
        got = session.run(None, {"x": x.numpy(), "step": step.numpy()})[0]
        # float rounding only (folded BN, table rows): outputs are O(1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
