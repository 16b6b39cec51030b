"""Models that quantize only with care, or not at all: non-finite weights, linear layers
under weight-only quantization, ops of custom domains and their libraries, models already
quantized, layers inside control-flow subgraphs, initializers a caller may override, and
weight-only quantization without calibration data."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import Net, make_model, ort_run, ort_session, run_cli
from onnx_lapq import QuantConfig, quantize
from onnx_lapq.runtime import session
from onnx_lapq.errors import CalibrationError, ConfigError, ModelError
from onnx_lapq.verify import integer_layers

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


# --------------------------------------------------------------------------- weight-only linear layers

LINEAR_LAYERS = {
    "matmul": lambda: _matmul_model(bias=False),
    "matmul-add": lambda: _matmul_model(),
    "gemm-transB-0": lambda: _gemm_model(trans_b=0),
    "gemm-transB-1": lambda: _gemm_model(trans_b=1),
    "gemm-beta": lambda: _gemm_model(beta=0.5),
}


@pytest.mark.parametrize("layer", list(LINEAR_LAYERS))
def test_weight_only_w4_takes_every_linear_layer_as_matmulnbits(layer):
    model = LINEAR_LAYERS[layer]()
    result = quantize(model, _calibration(), config=QuantConfig(weight_only=True, weight_bits=4))
    assert integer_layers(result.model) == (1, 1)  # one MatMulNBits in ONNX Runtime's graph
    x = _calibration(8, seed=1)[0]
    expected = ort_run(model, x)[0]
    assert np.linalg.norm(ort_run(result.model, x)[0] - expected) < 0.2 * np.linalg.norm(expected)  # 4-bit rounding only
    assert [i.name for i in result.model.graph.input] == ["x"] and [o.name for o in result.model.graph.output] == ["y"]


def test_weight_only_w8_takes_a_gemm():
    model = _gemm_model(trans_b=1)
    result = quantize(model, _calibration(), config=QuantConfig(weight_only=True, weight_bits=8))
    assert result.report["sites"]["weight_sites"] == 1
    x = _calibration(8, seed=1)[0]
    expected = ort_run(model, x)[0]
    assert np.linalg.norm(ort_run(result.model, x)[0] - expected) < 0.02 * np.linalg.norm(expected)  # 8-bit rounding only


# --------------------------------------------------------------------------- custom-domain ops

def _custom_op_model():
    """x -> MatMul mm -> com.example:Magic magic -> y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Magic", ["m"], ["y"], name="magic", domain="com.example")]
    return make_model(nodes, [("x", TensorProto.FLOAT, ["N", FEATURES])], [("y", TensorProto.FLOAT, ["N", CLASSES])],
                      {"W": rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)}, extra_opsets=[("com.example", 1)], check=False)


@pytest.fixture(scope="module")
def counting_library(tmp_path_factory):
    """A real custom op library that registers no op and counts its registrations."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a custom op library")
    folder = tmp_path_factory.mktemp("customop")
    source = folder / "count.c"
    source.write_text(
        "static int calls = 0;\n"
        "void *RegisterCustomOps(void *options, const void *api) { (void)options; (void)api; calls++; return 0; }\n"
        "int registrations(void) { return calls; }\n"
    )
    library = folder / "libcount.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)


def test_custom_domain_op_names_op_domain_and_flag():
    with pytest.raises(ModelError) as err:
        quantize(_custom_op_model(), _calibration())
    message = str(err.value)
    assert "Magic" in message and "'com.example'" in message and "--custom-op-library PATH" in message


def test_custom_domain_op_cli_exits_2(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(_save(_custom_op_model(), tmp_path / "m.onnx"), out / "q.onnx", "--calib", _calib_npz(tmp_path / "c.npz"))
    _assert_one_error_line(proc, "Magic", "com.example", "--custom-op-library")
    assert os.listdir(out) == []


def test_every_session_of_the_run_loads_the_custom_op_libraries(counting_library):
    registrations = ctypes.CDLL(counting_library).registrations
    before = registrations()
    quantize(_gemm_model(), _calibration(), config=QuantConfig(custom_op_libraries=(counting_library,)))
    # one check up front, then the calibration session and the exported model's three checking sessions
    assert registrations() - before >= 5
    during = registrations()
    session(_gemm_model())  # after the run: no library
    assert registrations() == during


def test_library_without_the_op_still_names_the_op(counting_library):
    with pytest.raises(ModelError, match="Magic"):
        quantize(_custom_op_model(), _calibration(), config=QuantConfig(custom_op_libraries=(counting_library,)))


def test_missing_custom_op_library_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig(custom_op_libraries=(str(tmp_path / "absent.so"),))
    with pytest.raises(ConfigError, match="tuple of strings"):
        QuantConfig(custom_op_libraries=(tmp_path,))


def test_invalid_custom_op_library_is_a_config_error_before_any_work(tmp_path):
    fake = tmp_path / "fake.so"
    fake.write_text("not a library\n")
    with pytest.raises(ConfigError, match="cannot load the custom op library"):
        quantize(_gemm_model(), _calibration(), config=QuantConfig(custom_op_libraries=(str(fake),)))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(_save(_gemm_model(), tmp_path / "m.onnx"), out / "q.onnx", "--calib", _calib_npz(tmp_path / "c.npz"),
                   "--custom-op-library", fake)
    _assert_one_error_line(proc, "fake.so")
    assert os.listdir(out) == []


def test_custom_op_library_flag_is_repeatable(tmp_path, counting_library):
    out = tmp_path / "q.onnx"
    proc = run_cli(_save(_gemm_model(), tmp_path / "m.onnx"), out, "--calib", _calib_npz(tmp_path / "c.npz"),
                   "--custom-op-library", counting_library, "--custom-op-library", counting_library, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["config"]["custom_op_libraries"] == [counting_library] * 2


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
    assert "'W' of node 'mm': each also a graph input" in message and "override" in message and "--exclude mm" in message


def test_ir3_initializers_listed_as_inputs_are_constants():
    """Under IR 3 every initializer had to be an input and ONNX Runtime treats them as constants."""
    model = _scaled_model(ir_version=3, weight_input=True)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))
    result = quantize(model, _calibration())
    assert [i.name for i in result.model.graph.input] == [i.name for i in ort_session(model).get_inputs()] == ["x"]
    assert result.report["sites"]["weight_sites"] == 1


# --------------------------------------------------------------------------- weight-only without calibration

def test_weight_only_needs_no_calibration():
    config = QuantConfig(weight_only=True, weight_bits=4)
    result = quantize(_matmul_model(), None, config=config)
    assert result.report["calibration_samples"] == 0
    assert integer_layers(result.model) == (1, 1)
    again = quantize(_matmul_model(), None, config=config)
    assert again.model.SerializeToString() == result.model.SerializeToString()
    given = quantize(_matmul_model(), _calibration(), config=config)
    assert given.model.SerializeToString() == result.model.SerializeToString()  # the data changes nothing


def test_weight_only_without_calibration_on_integer_inputs():
    """An embedding model's token ids: the synthetic sample must be valid indices."""
    net = Net(np.random.default_rng(0))
    net.inits["table"] = net.rng.standard_normal((50, 32)).astype(np.float32)
    emb = net.op("Gather", "embed", ["table", "ids"])
    masked = net.op("Mul", "masked", [emb, net.op("Unsqueeze", "mask3", [net.op("Cast", "maskf", ["mask"], to=TensorProto.FLOAT), "axis"])])
    net.inits["axis"] = np.array([2], np.int64)
    net.matmul("fc", masked, 32, 8)
    model = net.model([("ids", TensorProto.INT64, ["N", "T"]), ("mask", TensorProto.INT64, ["N", "T"])], [("fc", TensorProto.FLOAT, ["N", "T", 8])])
    result = quantize(model, None, config=QuantConfig(weight_only=True, weight_bits=4))
    assert integer_layers(result.model) == (1, 1)


def test_calibration_none_without_weight_only_says_what_to_do():
    with pytest.raises(CalibrationError, match="only weight_only"):
        quantize(_matmul_model(), None)


def test_cli_weight_only_without_calib(tmp_path):
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    proc = run_cli(_save(_matmul_model(), tmp_path / "m.onnx"), out, "--weight-only", "--weight-bits", "4", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "MatMulNBits" not in proc.stderr and out.exists()
    quantized = onnx.load(out)
    weights = [t for t in quantized.graph.initializer if list(t.dims) == [FEATURES, CLASSES]]
    assert [t.data_type for t in weights] == [TensorProto.INT4]  # the weight, stored as 4-bit codes
    assert json.loads(report.read_text())["calibration_samples"] == 0 and "fidelity" not in json.loads(report.read_text())


def test_cli_without_calib_names_the_flag(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(_save(_matmul_model(), tmp_path / "m.onnx"), out / "q.onnx")
    _assert_one_error_line(proc, "--calib CALIB.npz is required", "--weight-only")
    assert os.listdir(out) == []


def test_every_overridable_weight_is_named_in_one_refusal():
    rng = np.random.default_rng(0)
    inits = {"W1": rng.standard_normal((FEATURES, FEATURES)).astype(np.float32), "W2": rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    inputs = [("x", TensorProto.FLOAT, ["N", FEATURES]), ("W1", TensorProto.FLOAT, [FEATURES, FEATURES]), ("W2", TensorProto.FLOAT, [FEATURES, CLASSES])]
    model = make_model(nodes, inputs, [("y", TensorProto.FLOAT, ["N", CLASSES])], inits)
    with pytest.raises(ModelError) as err:
        quantize(model, _calibration())
    assert "'W1' of node 'mm1', 'W2' of node 'mm2': each also a graph input" in str(err.value)
    assert str(err.value).endswith("--exclude mm1 mm2")


def _quantized_layers(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes whose weight a DequantizeLinear (or MatMulNBits) makes."""
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "MatMulNBits"
            or (len(n.input) > 1 and made_by.get(n.input[1]) == "DequantizeLinear")}


@pytest.mark.parametrize("excluded, kept_float", [("MatMul", {"mm"}), ("Gemm", {"gemm"})])
def test_op_type_exclusions_mean_the_models_own_op_types(caplog, excluded, kept_float):
    """A 2-D MatMul + bias Add is a Gemm after normalization; excluding MatMul or Gemm still
    means the nodes the user's model has."""
    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((FEATURES, FEATURES)) / 8).astype(np.float32), "B": rng.standard_normal(FEATURES).astype(np.float32),
             "G": (rng.standard_normal((CLASSES, FEATURES)) / 8).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "B"], ["h"], name="add"),
             helper.make_node("Gemm", ["h", "G"], ["y"], name="gemm", transB=1)]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", FEATURES])], [("y", TensorProto.FLOAT, ["N", CLASSES])], inits)
    with caplog.at_level(logging.WARNING):
        result = quantize(model, _calibration(), config=QuantConfig(exclude_op_types=(excluded,)))
    assert _quantized_layers(result.model) == {"mm", "gemm"} - kept_float
    assert not [r for r in caplog.records if "excluded op type" in r.getMessage()]


def test_weight_only_gemms_sharing_a_weight_share_its_transposed_constant(capfd):
    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((FEATURES, FEATURES)) / 8).astype(np.float32), "C": rng.standard_normal(FEATURES).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="g1", transB=1, beta=0.5),
             helper.make_node("Gemm", ["h", "W", "C"], ["y"], name="g2", transB=1, beta=0.5)]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", FEATURES])], [("y", TensorProto.FLOAT, ["N", FEATURES])], inits)
    result = quantize(model, None, config=QuantConfig(weight_only=True, weight_bits=4))
    assert "share the same name" not in "".join(capfd.readouterr())  # onnx-graphsurgeon's warning, on stdout
    assert [t.name for t in result.model.graph.initializer].count("C_beta") == 1
    x = _calibration(8)[0]
    quantized, exact = ort_session(result.model).run(None, x)[0], ort_run(model, x)[0]
    assert np.abs(quantized - exact).mean() < 0.2 * np.abs(exact).mean()  # two 4-bit layers


def test_model_local_functions_are_inlined():
    """A model-local function of a custom domain is no custom op: its body is inlined, so it
    survives the conversion to the 4-bit opset (the version converter drops functions)."""
    swish = helper.make_function(
        "com.example", "Swish", ["X"], ["Y"],
        [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
        [helper.make_opsetid("", 13)],
    )
    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((FEATURES, CLASSES)) / 8).astype(np.float32)}
    nodes = [helper.make_node("Swish", ["x"], ["s"], name="act", domain="com.example"), helper.make_node("MatMul", ["s", "W"], ["y"], name="mm")]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["N", FEATURES])], [("y", TensorProto.FLOAT, ["N", CLASSES])], inits,
                       extra_opsets=[("com.example", 1)], check=False)
    model.functions.append(swish)
    onnx.checker.check_model(model)
    for config in (QuantConfig(weight_bits=4, act_bits=4), QuantConfig(weight_only=True, weight_bits=4)):
        result = quantize(model, _calibration(), config=config)
        assert not result.model.functions and not [n for n in result.model.graph.node if n.domain == "com.example"]
        assert _quantized_layers(result.model) == {"mm"}
        x = _calibration(8)[0]
        quantized, exact = ort_session(result.model).run(None, x)[0], ort_run(model, x)[0]
        assert np.abs(quantized - exact).mean() < 0.2 * np.abs(exact).mean()


def test_weight_only_with_matmul_excluded_by_op_type_is_a_config_error():
    with pytest.raises(ConfigError, match="excludes every layer it takes"):
        QuantConfig(weight_only=True, exclude_op_types=("MatMul",))
