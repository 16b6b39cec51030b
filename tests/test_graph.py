"""Graph normalization (onnx_lapq.graph.normalize): BatchNormalization and constant Adds fold
into the layers before them, a MatMul with a per-column Add becomes a Gemm, every fold keeps
the model's outputs, and the input model is never modified."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import Net, make_model, ort_run, random_inputs
from onnx_lapq import quantize
from onnx_lapq.graph import normalize
from onnx_lapq.verify import integer_layers


def bn_model():
    net = Net(np.random.default_rng(5))
    h = net.bn("bn1", net.conv("conv1", "x", 3, 4), 4)
    h = net.op("Relu", "relu1", [h])
    h = net.bn("bn2", net.conv("conv2", h, 4, 4, bias=False), 4)
    h = net.op("Flatten", "flat", [h], axis=1)
    h = net.bn("bn3", net.gemm("fc", h, 4 * 8 * 8, 6), 6)
    return net.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [(h, TensorProto.FLOAT, ["N", 6])])


def test_batchnorm_folded_same_outputs():
    model = bn_model()
    before = model.SerializeToString()
    folded = normalize(model)
    assert model.SerializeToString() == before  # the input is not modified
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 3
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Flatten", "Gemm"]
    feeds = random_inputs(model, 8, seed=1)[0]
    np.testing.assert_allclose(ort_run(folded, feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    result = quantize(model, random_inputs(model, 32))
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert len(result.plan.biases) == 3  # bias-less conv2 got its folded bias


def test_constant_add_after_biasless_conv_folds_into_bias():
    net = Net(np.random.default_rng(6))
    c = net.conv("conv1", "x", 3, 4, bias=False)
    net.inits["shift"] = np.random.default_rng(0).standard_normal((1, 4, 1, 1)).astype(np.float32)
    net.op("Add", "add", [c, "shift"])
    model = net.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [("add", TensorProto.FLOAT, ["N", 4, 8, 8])])
    folded = normalize(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(folded.graph.node[0].input) == 3
    feeds = random_inputs(model, 4)[0]
    np.testing.assert_allclose(ort_run(folded, feeds)[0], ort_run(model, feeds)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x_shape, c_shape, folds", [
    (["N", 8], (5,), True), (["N", 8], (1, 5), True), (["N", 8], (3, 5), False), (["N", 2, 8], (5,), False),
])
def test_matmul_bias_add_becomes_a_gemm_that_runs_on_integer_kernels(x_shape, c_shape, folds):
    """Add(MatMul(x, W), c) with a 2-D x and one c per column becomes Gemm(x, W, c), and then
    runs as ONNX Runtime's QGemm at W8A8 (it fused the pair into a float Gemm before)."""
    rng = np.random.default_rng(0)
    w, c = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal(c_shape).astype(np.float32)
    out_shape = x_shape[:-1] + [5] if c_shape != (3, 5) else [3, 5]
    model = make_model(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"]), onnx.helper.make_node("Add", ["y", "c"], ["z"])],
        [("x", TensorProto.FLOAT, x_shape)], [("z", TensorProto.FLOAT, out_shape)], {"w": w, "c": c},
    )
    normalized = normalize(model)
    assert [n.op_type for n in normalized.graph.node] == (["Gemm"] if folds else ["MatMul", "Add"])
    feeds = {"x": rng.standard_normal([3 if d == "N" else d for d in x_shape]).astype(np.float32)}
    np.testing.assert_allclose(ort_run(normalized, feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    if folds:
        calib = [{"x": rng.standard_normal((16, 8)).astype(np.float32)}]
        assert integer_layers(quantize(model, calib).model) == (1, 1)


def test_matmul_bias_add_folds_where_only_shape_inference_knows_the_input_is_2d():
    """A Reshape makes the MatMul's 2-D input and the model states no shapes: the fold reads
    the inferred rank.  Left as MatMul + Add, ONNX Runtime fuses the pair itself and moves the
    float Add onto the int32 bias grid, so the exported model's loss would not be the search's."""
    from onnx_lapq import LapqOptions, QuantConfig

    rng = np.random.default_rng(0)
    model = make_model(
        [onnx.helper.make_node("Reshape", ["x", "shape"], ["flat"]), onnx.helper.make_node("MatMul", ["flat", "w"], ["y"]),
         onnx.helper.make_node("Add", ["y", "c"], ["z"]), onnx.helper.make_node("Relu", ["z"], ["out"])],
        [("x", TensorProto.FLOAT, ["N", 4, 11])], [("out", TensorProto.FLOAT, ["M", 4])],
        {"shape": np.array([-1, 11], np.int64), "w": rng.standard_normal((11, 4)).astype(np.float32),
         "c": rng.standard_normal(4).astype(np.float32)},
    )
    assert not model.graph.value_info
    assert [n.op_type for n in normalize(model).graph.node] == ["Reshape", "Gemm", "Relu"]
    calibration = [{"x": rng.standard_normal((8, 4, 11)).astype(np.float32)}]
    config = QuantConfig(weight_bits=4, act_bits=7, method="lapq", bias_correction=False, weights="nearest", lapq=LapqOptions(max_evals=10, loss="mse"))
    result = quantize(model, calibration, config=config)
    assert result.exported_loss == pytest.approx(result.report["final_loss"], rel=1e-6)


@pytest.mark.parametrize("shape, folds", [((6,), False), ((6, 1), False), ((6, 1, 1), True), ((1, 6, 1, 1), True)])
def test_conv_bias_add_folds_only_per_channel_constants(shape, folds):
    """Add(Conv(x), c) becomes the Conv's bias only when c broadcasts along the channels."""
    rng = np.random.default_rng(0)
    w, c = rng.standard_normal((6, 3, 3, 3)).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    model = make_model(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), onnx.helper.make_node("Add", ["y", "c"], ["z"])],
        [("x", TensorProto.FLOAT, ["N", 3, 6, 6])], [("z", TensorProto.FLOAT, ["N", 6, 6, 6])], {"w": w, "c": c},
    )
    normalized = normalize(model)
    assert (len(normalized.graph.node) == 1) is folds
    x = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(normalized, x)[0], ort_run(model, x)[0], atol=1e-5)
