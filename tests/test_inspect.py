"""python -m onnx_lapq.inspect: per-layer widths, weight bytes and N:M patterns, read back from models."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto

import onnx_lapq
from conftest import DIGITS_CALIB, DIGITS_MODEL, Net, random_inputs
from onnx_lapq import QuantConfig
from onnx_lapq.inspect import inspect_model
from onnx_lapq.modelio import load_model
from onnx_lapq.nmmask import magnitude_mask, reduction_matrix, transposable_mask


def _sparse_model():
    """conv (8 -> 8 channels, 3x3) masked 2:4 over input channels, transposably; fc (MatMul 32 -> 8) masked 2:4 along K."""
    net = Net(np.random.default_rng(4))
    h = net.op("Relu", "relu", [net.conv("conv", "x", 8, 8)])
    h = net.op("Flatten", "flat", [net.op("GlobalAveragePool", "gap", [h])], axis=1)
    net.matmul("fc", net.op("Tile", "tile", [h, "reps"]), 32, 8)
    net.inits["reps"] = np.array([1, 4], np.int64)
    w = net.inits["conv_W"]  # [8, 8, 3, 3]: as [M, kh, kw, C] rows of 72, runs of 4 input channels
    mask = transposable_mask(reduction_matrix("Conv", w), 2, 4).reshape(8, 3, 3, 8)
    net.inits["conv_W"] = (w * np.moveaxis(mask, -1, 1)).astype(np.float32)
    fc = net.inits["fc_W"]  # [K=32, N=8]
    net.inits["fc_W"] = (fc * magnitude_mask(fc.T, 2, 4).T).astype(np.float32)
    return net.model([("x", TensorProto.FLOAT, ["N", 8, 6, 6])], [("fc", TensorProto.FLOAT, ["N", 8])])


def test_float_model_layers_are_dense_float_with_their_bytes():
    facts = inspect_model(load_model(str(DIGITS_MODEL)))
    assert [f.op_type for f in facts] == ["Conv"] * 5 + ["Gemm"]
    for f in facts:
        assert (f.weight_type, f.weight_bits, f.act_bits, f.pattern) == ("float", 32, None, None)
    assert facts[0].weight_bytes == 4 * 16 * 1 * 3 * 3  # conv1: 16 x 1 x 3 x 3 float32


@pytest.mark.parametrize("bits, container, code_bytes", [(4, "int4", 0.5), (3, "int8", 1)])
def test_quantized_layers_report_their_grids_and_packed_bytes(bits, container, code_bytes):
    model = load_model(str(DIGITS_MODEL))
    calib = dict(np.load(DIGITS_CALIB))
    result = onnx_lapq.quantize(model, [calib], config=QuantConfig(weight_bits=bits, act_bits=bits, weights="nearest"))
    facts = {f.node: f for f in inspect_model(result.model)}
    assert len(facts) == 6
    for f in facts.values():
        assert (f.weight_type, f.weight_bits, f.act_bits, f.granularity) == (container, bits, bits, "per channel")
    channels, numel = 16, 16 * 9  # conv1
    assert facts["conv1"].weight_bytes == int(numel * code_bytes) + 4 * channels + int(channels * code_bytes)  # codes, scales, zero points


def test_sparse_weights_keep_their_pattern_through_8_bit_quantization():
    model = _sparse_model()
    float_facts = {f.node: f for f in inspect_model(model)}
    assert (float_facts["conv"].pattern, float_facts["conv"].transposable) == ("2:4", True)
    assert float_facts["fc"].pattern == "2:4" and float_facts["fc"].zeros == 0.5
    result = onnx_lapq.quantize(model, random_inputs(model, 64, batch=32), config=QuantConfig())
    facts = {f.node: f for f in inspect_model(result.model)}
    assert (facts["conv"].weight_bits, facts["conv"].pattern, facts["conv"].transposable) == (8, "2:4", True)
    assert facts["fc"].pattern == "2:4" and facts["fc"].zeros == 0.5  # zero point 0: a pruned weight stays 0


def test_cli_prints_the_table_writes_json_and_refuses_a_missing_file(tmp_path):
    out = tmp_path / "facts.json"
    proc = subprocess.run([sys.executable, "-m", "onnx_lapq.inspect", str(DIGITS_MODEL), "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "6 layers, 58176 weight bytes" in proc.stdout
    assert [f["node"] for f in json.loads(out.read_text())] == ["conv1", "conv2", "conv3a", "conv3b", "conv4", "fc"]
    proc = subprocess.run([sys.executable, "-m", "onnx_lapq.inspect", str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
