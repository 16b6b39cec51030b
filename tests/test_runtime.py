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
