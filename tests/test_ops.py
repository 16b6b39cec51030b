"""Op facts (onnx_lapq.ops) against what ONNX Runtime's CPU provider really does with exported models."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import Net, conv_chain_model, ort_session, random_inputs, relu6_model
from onnx_lapq import QuantConfig, quantize
from onnx_lapq.ops import REQUANTIZED_OUTPUT_OPS, folds_clip_into_quantize, fuses_to_integer, output_channel_axis
from onnx_lapq.verify import integer_layers


def optimized_ops(model: onnx.ModelProto, tmp_path) -> list[onnx.NodeProto]:
    """The nodes of ``model`` as ONNX Runtime's CPU provider runs it (ORT_ENABLE_ALL)."""
    path = tmp_path / "optimized.onnx"
    ort_session(model, optimized_path=path)
    return list(onnx.load(str(path)).graph.node)


def exported(model: onnx.ModelProto, weight_bits: int, act_bits: int):
    return quantize(model, random_inputs(model, 16), config=QuantConfig(weight_bits=weight_bits, act_bits=act_bits))


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 8), (4, 8), (8, 16), (16, 16)])
def test_conv_and_gemm_run_as_integer_kernels_exactly_where_the_predicate_says(tmp_path, weight_bits, act_bits):
    result = exported(conv_chain_model(opset=21), weight_bits, act_bits)
    ops = collections.Counter(n.op_type for n in optimized_ops(result.model, tmp_path))
    fused = fuses_to_integer(weight_bits, act_bits)
    assert fused == (weight_bits == act_bits == 8)
    assert (ops["QLinearConv"], ops["QGemm"]) == ((2, 1) if fused else (0, 0))
    assert integer_layers(result.model) == ((3, 3) if fused else (0, 3))
    # a fused convolution's output is quantized (conv2's, after its Relu: relu1 is conv2's input anyway)
    outputs = {a["tensor"] for a in result.report["activations"] if a["role"] == "output"}
    assert outputs == ({"relu2"} if fused else set())


def test_fused_matmul_gets_no_output_site_and_runs_on_integers_with_a_float_output(tmp_path):
    net = Net(np.random.default_rng(0))
    net.matmul("mm2", net.op("Mul", "mul", [net.matmul("mm1", "x", 16, 16), "x"]), 16, 8)
    result = exported(net.model([("x", TensorProto.FLOAT, ["N", 16])], [("mm2", TensorProto.FLOAT, ["N", 8])]), 8, 8)
    ops = collections.Counter(n.op_type for n in optimized_ops(result.model, tmp_path))
    assert "MatMul" not in REQUANTIZED_OUTPUT_OPS and ops["MatMulIntegerToFloat"] == 2
    assert [a["tensor"] for a in result.report["activations"]] == ["x", "mul"]  # inputs only: mm1's output stays float


@pytest.mark.parametrize("bits", [8, 16, 4])
def test_relu6_clip_folds_into_quantize_exactly_where_the_predicate_says(tmp_path, bits):
    result = exported(relu6_model(opset=21), min(bits, 8), bits)
    nodes = optimized_ops(result.model, tmp_path)
    activations = {a.s for n in nodes if n.op_type == "FusedConv" for a in n.attribute if a.name == "activation"}
    kept = any(n.name in ("clip1", "clip2") for n in nodes) or b"Clip" in activations
    assert kept != folds_clip_into_quantize(bits)


def test_output_channel_axis():
    assert [output_channel_axis(op, 4) for op in ("Conv", "ConvTranspose")] == [0, 1]
    assert output_channel_axis("Gemm", 2, trans_b=True) == 0 and output_channel_axis("Gemm", 2) == 1
    assert output_channel_axis("MatMul", 2) == 1 and output_channel_axis("MatMul", 3) is None


def test_predicate_reads_every_grid_of_a_group():
    assert fuses_to_integer(8, 8, 8) and fuses_to_integer()
    assert not fuses_to_integer(8, 8, 4) and not fuses_to_integer(16)
