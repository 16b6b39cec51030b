"""float16 (and bfloat16-inside) models: quantized in float32, their interface kept."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS_CALIB, DIGITS_HELDOUT, DIGITS_MODEL, make_model, ort_session, run_cli
from onnx import TensorProto, helper, numpy_helper
from test_transformer import padded_batch, transformer_block

import onnx_lapq
from onnx_lapq.errors import CalibrationError, ModelError
from onnx_lapq.precision import to_float32
from onnx_lapq.verify import integer_layers
from onnx_lapq import LapqOptions

W8A8 = onnx_lapq.QuantConfig()
W4A4 = onnx_lapq.QuantConfig(weight_bits=4, act_bits=4)


def to_half(model: onnx.ModelProto, dtype: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """``model`` with every float32 initializer, Cast target and graph element type in ``dtype``
    (what a float16 export or converter makes)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(tensor).astype(helper.tensor_dtype_to_np_dtype(dtype))
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = dtype
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = dtype
    onnx.checker.check_model(half)
    return half


def interface(session: ort.InferenceSession) -> list[tuple[str, str, list]]:
    """(name, type, shape) of each input and output, as ONNX Runtime sees them."""
    return [(v.name, v.type, v.shape) for v in session.get_inputs() + session.get_outputs()]


def loads_with_all_optimizations(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def top1(session: ort.InferenceSession) -> float:
    """Top-1 on the shipped held-out split, scored as tools/eval_digits.py does."""
    data = np.load(DIGITS_HELDOUT)
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    return float(np.mean(session.run(None, {"input": data["input"].astype(dtype)})[0].argmax(axis=1) == data["label"]))


@pytest.fixture(scope="module")
def digits():
    return onnx.load(DIGITS_MODEL)


@pytest.fixture(scope="module")
def digits_half(digits):
    return to_half(digits)


def half_calibration():
    return [{"input": np.load(DIGITS_CALIB)["input"].astype(np.float16)}]


@pytest.mark.parametrize("config", [W8A8, W4A4], ids=["W8A8", "W4A4"])
def test_float16_digits_keeps_its_interface_and_accuracy(digits, digits_half, config):
    result = onnx_lapq.quantize(digits_half, half_calibration(), config=config)
    session = loads_with_all_optimizations(result.model)
    assert interface(session) == interface(ort_session(digits_half))
    assert result.report["float_type"] == "float16"
    float32_result = onnx_lapq.quantize(digits, [{"input": np.load(DIGITS_CALIB)["input"]}], config=config)
    assert float32_result.report["float_type"] == "float32"
    assert abs(top1(session) - top1(ort_session(float32_result.model))) <= 0.02
    layers = integer_layers(result.model)
    assert layers == ((6, 6) if config is W8A8 else (0, 6))  # the interface Casts leave ONNX Runtime's integer fusion alone


@pytest.mark.parametrize("bits", ["8", "4"])
def test_float16_digits_cli(digits_half, tmp_path, bits):
    model, calib, out = tmp_path / "digits16.onnx", tmp_path / "calib16.npz", tmp_path / "q.onnx"
    onnx.save(digits_half, model)
    np.savez(calib, **half_calibration()[0])
    proc = run_cli(model, out, "--calib", calib, "--weight-bits", bits, "--act-bits", bits)
    assert proc.returncode == 0, proc.stderr
    methods = "minmax" if bits == "8" else "adaround weights, minmax clipping"  # weights="auto" reconstructs below 8 bits
    assert f"(W{bits}A{bits}, float16 model quantized in float32, {methods})" in proc.stdout
    session = loads_with_all_optimizations(onnx.load(out))
    assert interface(session) == interface(ort_session(digits_half))
    assert top1(session) >= 0.95


def test_float16_lapq_exported_loss_is_the_search_loss(digits_half):
    config = onnx_lapq.QuantConfig(method="lapq", lapq=LapqOptions(max_evals=40))
    report = onnx_lapq.quantize(digits_half, half_calibration(), config=config).report
    # the exported model's outputs are float16, as the model's: their rounding is all that differs
    assert report["exported_loss"] == pytest.approx(report["final_loss"], rel=0.01)


def test_float16_calibration_in_float32_is_refused_with_the_fix(digits_half):
    with pytest.raises(CalibrationError, match=r"is float32 but the model takes float16: convert it with \.astype\(np\.float16\)"):
        onnx_lapq.quantize(digits_half, [{"input": np.load(DIGITS_CALIB)["input"]}])


def test_float16_transformer_block(tmp_path):
    block = to_half(transformer_block())  # MatMuls on [B, T, D], LayerNorm, Erf, Softmax, Cast(mask, to=float16)
    calibration = [{k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in padded_batch(32, 8).items()}]
    result = onnx_lapq.quantize(block, calibration)
    session = loads_with_all_optimizations(result.model)
    assert interface(session) == interface(ort_session(block))
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in padded_batch(4, 11, seed=3).items()}
    ref, out = ort_session(block).run(None, feeds)[0], session.run(None, feeds)[0]
    assert out.dtype == np.float16 and out.shape == (4, 11, 16)
    assert np.abs(out.astype(np.float32) - ref).mean() < 0.05 * np.abs(ref.astype(np.float32)).mean()
    integer, layers = integer_layers(result.model)
    assert integer == layers == 6


def mixed_conv(inner: int) -> onnx.ModelProto:
    """float32 in and out, a Conv in ``inner`` (float16 or bfloat16) between Casts, as a
    converter that keeps the I/O types makes it; its weight from a Constant node."""
    rng = np.random.default_rng(0)
    np_type = helper.tensor_dtype_to_np_dtype(inner)
    weight = helper.make_tensor("w", inner, [4, 1, 3, 3], rng.standard_normal((4, 1, 3, 3)).astype(np_type).tobytes(), raw=True)
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=inner),
        helper.make_node("Constant", [], ["w"], value=weight),
        helper.make_node("Conv", ["xh", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
    ]
    return make_model(nodes, [("x", TensorProto.FLOAT, ["N", 1, 8, 8])], [("y", TensorProto.FLOAT, ["N", 4, 8, 8])])


@pytest.mark.parametrize("inner", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["float16", "bfloat16"])
def test_float32_interface_with_reduced_precision_inside(inner):
    model = mixed_conv(inner)
    x = np.random.default_rng(1).standard_normal((64, 1, 8, 8)).astype(np.float32)
    result = onnx_lapq.quantize(model, [{"x": x}])
    assert result.report["float_type"] == helper.tensor_dtype_to_np_dtype(inner).name
    assert result.report["sites"]["weight_sites"] == 1
    session = loads_with_all_optimizations(result.model)
    assert [(v.name, v.type) for v in session.get_inputs() + session.get_outputs()] == [("x", "tensor(float)"), ("y", "tensor(float)")]
    weight = numpy_helper.to_array(mixed_conv(inner).graph.node[1].attribute[0].t).astype(np.float32)
    ref = np.maximum(0, _conv3x3(x, weight))
    assert np.abs(session.run(None, {"x": x})[0] - ref).mean() < 0.02 * np.abs(ref).mean()


def _conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N, 1, 8, 8, 3, 3
    return np.einsum("nchwij,ocij->nohw", windows, w)


def test_bfloat16_interface_is_refused_with_the_fix():
    model = to_half(mixed_conv(TensorProto.FLOAT16), TensorProto.BFLOAT16)
    with pytest.raises(ModelError, match=r"\['x', 'y'\] are bfloat16.*float32 \(or float16\) inputs and outputs"):
        onnx_lapq.quantize(model, [{"x": np.zeros((1, 1, 8, 8), np.float32)}])


def test_float32_model_passes_through_unchanged(digits):
    widened, kept = to_float32(digits)
    assert widened is digits and kept.float_type == "float32" and kept.restore(digits) is digits


def test_float16_output_that_a_node_also_reads(digits_half):
    """logits is an output and ArgMax's input; the int64 class output keeps its type."""
    model = onnx.ModelProto()
    model.CopyFrom(digits_half)
    model.graph.node.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    result = onnx_lapq.quantize(model, half_calibration())
    session = loads_with_all_optimizations(result.model)
    assert interface(session) == interface(ort_session(model))
    logits, label = session.run(None, {"input": half_calibration()[0]["input"]})
    assert logits.dtype == np.float16 and np.array_equal(label, logits.argmax(axis=1))


def test_float16_overridable_initializer_keeps_its_type_and_stays_overridable():
    """x -> Mul by 'gain' (an initializer also listed as a graph input: a caller may override
    it, and it is not quantized) -> MatMul mm -> y, all float16: 'gain' stays a float16 input."""
    rng = np.random.default_rng(0)
    inits = {"gain": np.full((1, 16), 2.0, np.float32), "W": (rng.standard_normal((16, 4)) / 8).astype(np.float32)}
    nodes = [helper.make_node("Mul", ["x", "gain"], ["g"], name="scale"), helper.make_node("MatMul", ["g", "W"], ["y"], name="mm")]
    inputs = [("x", TensorProto.FLOAT, ["N", 16]), ("gain", TensorProto.FLOAT, [1, 16])]
    model = to_half(make_model(nodes, inputs, [("y", TensorProto.FLOAT, ["N", 4])], inits))
    assert model.ir_version >= 4
    x = {"x": rng.standard_normal((64, 16)).astype(np.float16)}
    result = onnx_lapq.quantize(model, [x])
    session = loads_with_all_optimizations(result.model)
    assert interface(session) == interface(ort_session(model))
    for kept, values in [(result.model.graph.input, model.graph.input), (result.model.graph.output, model.graph.output)]:
        assert [v.SerializeToString() for v in kept] == [v.SerializeToString() for v in values]  # 'gain' among them
    gain = {"gain": np.full((1, 16), 0.5, np.float16)}
    overridden, default = session.run(None, {**x, **gain})[0], session.run(None, x)[0]
    assert overridden.dtype == default.dtype == np.float16
    np.testing.assert_allclose(overridden, ort_session(model).run(None, {**x, **gain})[0], atol=0.05)
    np.testing.assert_allclose(default, ort_session(model).run(None, x)[0], atol=0.1)


def test_bfloat16_overridable_initializer_becomes_a_float32_input():
    """Overridable initializers join the float16 interface only: a bfloat16 one (which ONNX
    Runtime's Python API cannot feed) is converted to float32, as every bfloat16 tensor."""
    gain = helper.make_tensor("gain", TensorProto.BFLOAT16, [1, 16], np.ones(16, np.float32).tolist())
    weight = helper.make_tensor("W", TensorProto.BFLOAT16, [16, 4], (np.arange(64, dtype=np.float32) / 64).tolist())
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16), helper.make_node("Mul", ["xb", "gain"], ["g"], name="scale"),
             helper.make_node("MatMul", ["g", "W"], ["yb"], name="mm"), helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                                           helper.make_tensor_value_info("gain", TensorProto.BFLOAT16, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [gain, weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = onnx_lapq.quantize(model, [{"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}])
    inputs = {i.name: i.type.tensor_type.elem_type for i in result.model.graph.input}
    assert inputs == {"x": TensorProto.FLOAT, "gain": TensorProto.FLOAT}
