"""The bit-width policy (onnx_lapq.bits): precedence, bits files, and what it does to plans and exported models."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import DIGITS_CALIB, DIGITS_MODEL, Net, block_model, random_inputs, run_cli
from onnx_lapq import ConfigError, QuantConfig, quantize
from onnx_lapq.bits import BitsPolicy, LayerBits, read_bits_file
from onnx_lapq.errors import BitsFileError
from onnx_lapq.graph import INT4_OPSET, MIN_OPSET, normalize
from onnx_lapq.plan import build_plan

CONVS = ["conv1", "conv2", "conva", "convb", "conv3", "conv4"]


def plan_of(model, **config):
    config = QuantConfig(**config)
    return build_plan(normalize(model, min_opset=INT4_OPSET if config.needs_opset21 else MIN_OPSET), config)


def weight_bits(plan) -> dict[str, int]:
    return {w.node: w.bits for w in plan.weights}


def act_bits(plan) -> dict[str, int]:
    return {a.tensor: a.bits for a in plan.activations}


# --------------------------------------------------------------------------- the policy


def test_precedence_explicit_over_first_last_over_uniform_width_by_width():
    policy = BitsPolicy(4, 3, first_last_8bit=True, layers=(LayerBits("first", weight_bits=6), LayerBits("mid", act_bits=5)))
    assert policy.bits("first", edge=True) == (6, 8)  # the entry's weight bits, the edge's activation bits
    assert policy.bits("mid") == (4, 5)  # the entry's activation bits, the uniform weight bits
    assert policy.bits("last", edge=True) == (8, 8)
    assert policy.bits("other") == (4, 3)
    assert BitsPolicy(4, 3, first_last_8bit=False).bits("first", edge=True) == (4, 3)
    assert policy.edges(["a", "b", "c"]) == {"a", "c"} and BitsPolicy().edges(["a", "b"]) == set()


def test_config_takes_a_mapping_and_keeps_it_frozen_and_json_ready():
    config = QuantConfig(weight_bits=4, layer_bits={"fc": {"weight_bits": 8}, "conv1": {"act_bits": 8, "weight_bits": 6}})
    assert config.layer_bits == (LayerBits("fc", 8, None), LayerBits("conv1", 6, 8))
    assert config.bits_policy == BitsPolicy(4, 8, False, config.layer_bits)
    hash(config)
    assert json.loads(json.dumps(asdict(config)))["layer_bits"] == [
        {"node": "fc", "weight_bits": 8, "act_bits": None}, {"node": "conv1", "weight_bits": 6, "act_bits": 8},
    ]
    assert QuantConfig(layer_bits=config.layer_bits).layer_bits == config.layer_bits
    assert QuantConfig(act_bits=8, layer_bits={"fc": {"act_bits": 16}}).needs_opset21


@pytest.mark.parametrize("layer_bits, match", [
    ({"fc": {"weight_bits": 9}}, "weight_bits=9 for layer 'fc' is not supported: use one of 2, 3"),
    ({"fc": {"weight_bits": True}}, "is not supported"),
    ({"fc": {"bits": 4}}, "must be an object with weight_bits and/or act_bits"),
    ({"fc": {}}, "must be an object with weight_bits and/or act_bits"),
    ({"fc": 4}, "must be an object with weight_bits and/or act_bits"),
    ({"": {"weight_bits": 4}}, "the key must be a node name"),
    (5, "must map node names to their bits"),
    ((LayerBits("fc", 4), LayerBits("fc", act_bits=4)), "names 'fc' more than once"),
])
def test_config_rejects_bad_layer_bits(layer_bits, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(layer_bits=layer_bits)


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not JSON .*: write it as {\"layers\""),
    ('{"conv1": {"weight_bits": 4}}', "must hold one object with a \"layers\" object"),
    ('{"layers": [1, 2]}', "must hold one object with a \"layers\" object"),
    ('{"layers": {"fc": {"weight_bits": 9}}}', "bits.json.*: weight_bits=9 for layer 'fc' is not supported"),
    ('{"layers": {"fc": {"weight": 4}}}', "bits.json.*must be an object with weight_bits and/or act_bits"),
])
def test_bits_file_errors_say_how_to_fix_the_file(tmp_path, text, match):
    path = tmp_path / "bits.json"
    path.write_text(text)
    with pytest.raises(BitsFileError, match=match):
        read_bits_file(str(path))


def test_bits_file_reads_entries(tmp_path):
    path = tmp_path / "bits.json"
    path.write_text('{"layers": {"conv1": {"weight_bits": 8, "act_bits": 8}, "fc": {"weight_bits": 4}}}')
    assert read_bits_file(str(path)) == (LayerBits("conv1", 8, 8), LayerBits("fc", 4, None))
    with pytest.raises(BitsFileError, match="cannot read the bits file"):
        read_bits_file(str(tmp_path / "missing.json"))


# --------------------------------------------------------------------------- plans


def test_unknown_node_is_a_config_error_at_plan_time_naming_real_layers():
    with pytest.raises(ConfigError, match=r"'conv9'.*does not have.*'conv1', 'conv2'"):
        plan_of(block_model(), layer_bits={"conv9": {"weight_bits": 4}})


def test_entry_for_a_node_that_is_not_quantized_warns_and_changes_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="onnx_lapq.bits"):
        plan = plan_of(block_model(), layer_bits={"relu1": {"weight_bits": 4}})
    assert "'relu1' change nothing" in caplog.text
    assert plan == plan_of(block_model())


def test_first_last_equals_the_mapping_that_names_the_first_and_last_layer():
    edges = {"conv1": {"weight_bits": 8, "act_bits": 8}, "fc": {"weight_bits": 8, "act_bits": 8}}
    first_last = plan_of(block_model(), weight_bits=4, act_bits=4, keep_first_last_8bit=True)
    assert first_last == plan_of(block_model(), weight_bits=4, act_bits=4, layer_bits=edges)
    assert weight_bits(first_last) == {**dict.fromkeys(CONVS[1:], 4), "conv1": 8, "fc": 8}


def test_an_activation_read_by_layers_of_different_widths_takes_the_widest():
    assert act_bits(plan_of(block_model(), layer_bits={"conva": {"act_bits": 4}}))["relu2"] == 8
    both = plan_of(block_model(), layer_bits={"conva": {"act_bits": 4}, "convb": {"act_bits": 4}})
    assert act_bits(both)["relu2"] == 4 and act_bits(both)["relu1"] == 8


def test_weight_only_plan_reads_the_weight_bits():
    net = Net(np.random.default_rng(0))
    net.matmul("mm2", net.op("Relu", "relu", [net.matmul("mm1", "x", 64, 64)]), 64, 32)
    model = net.model([("x", TensorProto.FLOAT, ["N", 64])], [("mm2", TensorProto.FLOAT, ["N", 32])])
    result = quantize(model, None, config=QuantConfig(weight_only=True, weight_bits=4, layer_bits={"mm2": {"weight_bits": 8}}))
    assert {w["node"]: w["bits"] for w in result.report["weights"]} == {"mm1": 4, "mm2": 8}


# --------------------------------------------------------------------------- exported models


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_W_quantized")}


def test_one_layer_at_4_bits_exports_int4_weights_and_the_others_int8():
    model = block_model()
    result = quantize(model, random_inputs(model, 16), config=QuantConfig(layer_bits={"conv3": {"weight_bits": 4}}))
    types = _initializer_types(result.model)
    assert types.pop("conv3_W_quantized") == TensorProto.INT4
    assert set(types.values()) == {TensorProto.INT8} and len(types) == len(CONVS)  # the other convs and fc


def test_first_last_exports_the_same_model_as_the_mapping():
    model, edges = block_model(), {"conv1": {"weight_bits": 8, "act_bits": 8}, "fc": {"weight_bits": 8, "act_bits": 8}}
    batches = random_inputs(model, 16)
    first_last = quantize(model, batches, config=QuantConfig(weight_bits=4, act_bits=4, keep_first_last_8bit=True))
    mapped = quantize(model, batches, config=QuantConfig(weight_bits=4, act_bits=4, layer_bits=edges))
    assert first_last.model.SerializeToString() == mapped.model.SerializeToString()


def test_cli_bits_file(tmp_path):
    bits, out, report = tmp_path / "bits.json", tmp_path / "out.onnx", tmp_path / "report.json"
    bits.write_text('{"layers": {"conv4": {"weight_bits": 4, "act_bits": 4}}}')
    proc = run_cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--bits-file", bits, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "CPU kernels take 8-bit grids only" in proc.stdout  # conv4 runs dequantized
    rep = json.loads(report.read_text())
    conv4 = next(w for w in rep["weights"] if w["node"] == "conv4")
    assert conv4["bits"] == 4 and {w["bits"] for w in rep["weights"] if w is not conv4} == {8}
    assert rep["config"]["layer_bits"] == [{"node": "conv4", "weight_bits": 4, "act_bits": 4}]
    types = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert types[conv4["tensor"] + "_quantized"] == TensorProto.INT4

    bits.write_text('{"layers": {"conv4": {"weight_bits": 9}}}')
    proc = run_cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--bits-file", bits)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"the bits file '{bits}': weight_bits=9 for layer 'conv4' is not supported" in proc.stderr  # the file's own keys
    bits.write_text('{"layers": {"conv9": {"weight_bits": 4}}}')
    proc = run_cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--bits-file", bits)
    assert proc.returncode == 2 and "'conv9', which the model does not have" in proc.stderr and "'conv1'" in proc.stderr
