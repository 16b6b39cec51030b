"""ONNX Runtime sessions: arena choices and the shared arena's release."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import conv_chain_model

from onnx_lapq.runtime import release_shared_arena, session


def test_session_arena_choices():
    model = conv_chain_model()
    assert session(model).get_session_options().enable_cpu_mem_arena
    assert not session(model, arena="none").get_session_options().enable_cpu_mem_arena
    with pytest.raises(ValueError, match="arena"):
        session(model, arena="private")


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_release_shared_arena_returns_its_free_memory():
    """Intermediates of a shared-arena session stay resident after the run (the arena keeps
    them for the next session) until release_shared_arena gives them back."""
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["a"]), onnx.helper.make_node("Neg", ["a"], ["b"]), onnx.helper.make_node("ReduceSum", ["b"], ["y"])],
        "big_intermediates", [value("x", onnx.TensorProto.FLOAT, [None])], [value("y", onnx.TensorProto.FLOAT, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    x = np.ones(24 << 20, np.float32)  # 96 MB per intermediate
    session(model, arena="shared").run(None, {"x": x})
    held = _resident_mb()
    release_shared_arena()
    assert held - _resident_mb() > 100


def test_large_initializers_reach_the_session_as_arrays_with_the_same_results():
    """Initializers over a MB go to ONNX Runtime as in-memory arrays, except types numpy cannot
    hold (4-bit), which go as bytes: outputs equal those of the model passed as plain bytes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((600, 600)).astype(np.float32)  # 1.4 MB
    codes = rng.integers(-8, 8, (4096, 600)).astype(np.int8)  # 1.2 MB as int4
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "scale"], ["w4"], axis=1),
        helper.make_node("MatMul", ["x", "w4"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["b"]),
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["b", "h32"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "w"), helper.make_tensor("codes", TensorProto.INT4, codes.shape, codes.ravel().tolist()),
        numpy_helper.from_array(np.full(600, 0.01, np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal(600).astype(np.float16), "h"),
    ]
    graph = helper.make_graph(nodes, "lean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feed = {"x": rng.standard_normal((3, 4096)).astype(np.float32)}
    for optimize in (True, False):
        options = ort.SessionOptions()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        expected = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        np.testing.assert_array_equal(session(model, optimize=optimize).run(None, feed)[0], expected)
