"""Models that quantize only with care, or not at all: non-finite weights, models already
quantized, layers inside control-flow subgraphs, initializers a caller may override."""
from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, ort_run, ort_session, run_cli
from onnx_lapq import QuantConfig, quantize
from onnx_lapq.errors import ModelError

FEATURES, CLASSES = 64, 16


def _calibration(n=64, seed=0, features=FEATURES):
    return [{"x": np.random.default_rng(seed).standard_normal((n, features)).astype(np.float32)}]


def _gemm_model(*, trans_b=1, beta=1.0, seed=0):
    """x[N,64] -> Gemm fc (weight fc_W, bias fc_B) -> y[N,16]."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((FEATURES, CLASSES)) / 8).astype(np.float32)
    inits = {"fc_W": w.T.copy() if trans_b else w, "fc_B": rng.standard_normal(CLASSES).astype(np.float32)}
    node = helper.make_node("Gemm", ["x", "fc_W", "fc_B"], ["y"], name="fc", transB=trans_b, beta=beta)
    return make_model([node], [("x", TensorProto.FLOAT, ["N", FEATURES])], [("y", TensorProto.FLOAT, ["N", CLASSES])], inits)


def _matmul_model(*, bias=True, seed=0):
    """x[N,64] -> MatMul mm (weight W) [-> Add add (bias B)] -> y[N,16]."""
    rng = np.random.default_rng(seed)
    inits = {"W": (rng.standard_normal((FEATURES, CLASSES)) / 8).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias else "y"], name="mm")]
    if bias:
        inits["B"] = rng.standard_normal(CLASSES).astype(np.float32)
        nodes.append(helper.make_node("Add", ["m", "B"], ["y"], name="add"))
    return make_model(nodes, [("x", TensorProto.FLOAT, ["N", FEATURES])], [("y", TensorProto.FLOAT, ["N", CLASSES])], inits)


def _with_value(model, name, index, value):
    """``model`` with element ``index`` of initializer ``name`` set to ``value``."""
    init = next(t for t in model.graph.initializer if t.name == name)
    array = numpy_helper.to_array(init).copy()
    array.flat[index] = value
    init.CopyFrom(numpy_helper.from_array(array, name))
    return model


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _calib_npz(path, n=64):
    np.savez(path, **_calibration(n)[0])
    return path


def _assert_one_error_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx_lapq: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- non-finite weights

NON_FINITE = {"weight-inf": ("fc_W", np.inf, "1 Inf"), "weight-nan": ("fc_W", np.nan, "1 NaN"),
              "bias-inf": ("fc_B", -np.inf, "1 Inf"), "bias-nan": ("fc_B", np.nan, "1 NaN")}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_weight_or_bias_is_refused_by_name(case):
    tensor, value, count = NON_FINITE[case]
    model = _with_value(_gemm_model(), tensor, 5, value)
    with pytest.raises(ModelError) as err:
        quantize(model, _calibration())
    message = str(err.value)
    assert f"{tensor!r} of node 'fc'" in message and count in message and "--exclude fc" in message and "\n" not in message


@pytest.mark.parametrize("case", ["weight-inf", "bias-nan"])
def test_non_finite_weight_cli_exits_2_and_writes_nothing(tmp_path, case):
    tensor, value, count = NON_FINITE[case]
    model = _save(_with_value(_gemm_model(), tensor, 5, value), tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(model, out / "q.onnx", "--calib", _calib_npz(tmp_path / "c.npz"))
    _assert_one_error_line(proc, repr(tensor), count)
    assert "RuntimeWarning" not in proc.stderr
    assert os.listdir(out) == []


def test_excluded_layer_may_hold_non_finite_weights():
    model = _with_value(_gemm_model(), "fc_W", 5, np.inf)
    with pytest.raises(ModelError, match="nothing to quantize"):  # the only layer excluded: nothing left, no weight complaint
        quantize(model, _calibration(), config=QuantConfig(exclude=("fc",)))


# --------------------------------------------------------------------------- already quantized

@pytest.mark.parametrize("weight_only", [False, True])
def test_already_quantized_model_is_named_so(weight_only):
    quantized = quantize(_matmul_model(bias=False), _calibration(), config=QuantConfig(weight_only=weight_only, weight_bits=4 if weight_only else 8)).model
    with pytest.raises(ModelError) as err:
        quantize(quantized, _calibration(), config=QuantConfig(weight_only=weight_only))
    assert "already quantized" in str(err.value) and "DequantizeLinear" in str(err.value) and "float model" in str(err.value)


# --------------------------------------------------------------------------- subgraphs

def _if_model():
    """x[N,16] -> MatMul mm -> If cond: then MatMul inner_mm (outer weight W) and Gemm inner_fc, else Identity."""
    rng = np.random.default_rng(0)
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 16])  # noqa: E731
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["t"], name="inner_mm"), helper.make_node("Gemm", ["t", "W"], ["o"], name="inner_fc")],
        "then", [], [out("o")])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["e"], name="keep")], "else", [], [out("e")])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        helper.make_node("If", ["c"], ["y"], name="cond", then_branch=then, else_branch=other),
    ]
    inits = {"W": (rng.standard_normal((16, 16)) / 4).astype(np.float32), "zero": np.array(0, np.float32)}
    return make_model(nodes, [("x", TensorProto.FLOAT, ["N", 16])], [("y", TensorProto.FLOAT, ["N", 16])], inits)


def test_layers_inside_subgraphs_are_warned_about(caplog):
    model = _if_model()
    with caplog.at_level(logging.WARNING, logger="onnx_lapq"):
        result = quantize(model, _calibration(8, features=16))
    warnings = [r.getMessage() for r in caplog.records if "subgraphs" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 ") and "If node 'cond'" in warnings[0] and "stay float" in warnings[0]
    assert result.report["sites"]["weight_sites"] == 1  # mm alone


# --------------------------------------------------------------------------- initializers listed as inputs

def _scaled_model(*, ir_version=8, weight_input=False):
    """x -> Mul by initializer 'gain' (also a graph input: overridable) -> MatMul mm -> y."""
    rng = np.random.default_rng(0)
    inits = {"gain": np.full((1, FEATURES), 2.0, np.float32), "W": (rng.standard_normal((FEATURES, CLASSES)) / 8).astype(np.float32)}
    nodes = [helper.make_node("Mul", ["x", "gain"], ["g"], name="scale"), helper.make_node("MatMul", ["g", "W"], ["y"], name="mm")]
    inputs = [("x", TensorProto.FLOAT, ["N", FEATURES]), ("gain", TensorProto.FLOAT, [1, FEATURES])]
    if weight_input:
        inputs.append(("W", TensorProto.FLOAT, [FEATURES, CLASSES]))
    model = make_model(nodes, inputs, [("y", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model.ir_version = ir_version
    return model


def _interface(model):
    return [(i.name, i.type.SerializeToString()) for i in model.graph.input]


def test_overridable_initializer_stays_an_input_and_overridable():
    model = _scaled_model()
    result = quantize(model, _calibration())
    assert _interface(result.model) == _interface(model)
    x = _calibration(4, seed=1)[0]
    gain = np.full((1, FEATURES), 0.5, np.float32)
    overridden = ort_session(result.model).run(None, {**x, "gain": gain})[0]
    default = ort_session(result.model).run(None, x)[0]
    np.testing.assert_allclose(overridden, ort_run(model, {**x, "gain": gain})[0], atol=0.05)
    np.testing.assert_allclose(default, ort_run(model, x)[0], atol=0.1)


def test_overridable_weight_is_refused_with_the_reason():
    with pytest.raises(ModelError) as err:
        quantize(_scaled_model(weight_input=True), _calibration())
    message = str(err.value)
    assert "'W' of node 'mm' is also a graph input" in message and "override" in message and "--exclude mm" in message


def test_ir3_initializers_listed_as_inputs_are_constants():
    """Under IR 3 every initializer had to be an input and ONNX Runtime treats them as constants."""
    model = _scaled_model(ir_version=3, weight_input=True)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))
    result = quantize(model, _calibration())
    assert [i.name for i in result.model.graph.input] == [i.name for i in ort_session(model).get_inputs()] == ["x"]
    assert result.report["sites"]["weight_sites"] == 1
