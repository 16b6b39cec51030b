"""unfold.LayerShape: patches times the weight matrix is what ONNX Runtime's layer computes."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lapq.runtime import session
from onnx_lapq.unfold import LayerShape


def _run_layer(node, x, weight):
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return session(model).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("attrs, weight_shape, in_channels", [
    ({}, (6, 3, 3, 3), 3),
    ({"strides": [2, 2], "pads": [1, 0, 1, 2]}, (6, 3, 3, 3), 3),
    ({"dilations": [2, 1], "pads": [2, 1, 2, 1]}, (4, 2, 3, 3), 2),
    ({"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (8, 1, 3, 3), 4),
    ({"group": 2}, (4, 3, 1, 1), 6),
    ({"strides": [2], "pads": [1, 1]}, (5, 3, 3), 3),
])
def test_conv_patches_reproduce_the_layer(attrs, weight_shape, in_channels):
    rng = np.random.default_rng(0)
    spatial = (9, 8)[: len(weight_shape) - 2]
    x = rng.standard_normal((2, in_channels) + spatial).astype(np.float32)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    y = _run_layer(node, x, w)
    layer = LayerShape.of(node, w.shape)
    every = np.arange(layer.positions(x))
    p = layer.patches(x, every)  # [G, n, d]
    out = np.matmul(layer.to_matrix(w), p.transpose(0, 2, 1))  # [G, r, n]
    out = out.reshape(w.shape[0], x.shape[0], *y.shape[2:]).swapaxes(0, 1)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.patch_sum(x), p.sum(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(w)), w)
    chosen = np.array([0, 3, len(every) - 1])
    np.testing.assert_array_equal(layer.patches(x, chosen), p[:, chosen])


@pytest.mark.parametrize("op, trans_b", [("Gemm", True), ("Gemm", False), ("MatMul", False)])
def test_linear_layers_unfold_to_rows_of_outputs(op, trans_b):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5) if op == "MatMul" else (3, 5)).astype(np.float32)
    w = rng.standard_normal((7, 5) if trans_b else (5, 7)).astype(np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], **({"transB": 1} if trans_b else {}))
    y = _run_layer(node, x, w)
    layer = LayerShape.of(node, w.shape)
    p = layer.patches(x, np.arange(layer.positions(x)))
    out = (layer.to_matrix(w)[0] @ p[0].T).T.reshape(y.shape)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(w)), w)


def test_layers_that_do_not_unfold_say_why():
    assert "auto_pad" in LayerShape.of(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"), (2, 2, 3, 3))
    assert "transA" in LayerShape.of(helper.make_node("Gemm", ["x", "w"], ["y"], transA=1), (2, 2))
    assert "3-D" in LayerShape.of(helper.make_node("MatMul", ["x", "w"], ["y"]), (2, 2, 2))
    assert isinstance(LayerShape.of(onnx.helper.make_node("ConvTranspose", ["x", "w"], ["y"]), (2, 2, 3, 3)), str)
