"""Cuts of the evaluator's graph: a suffix rounds as the whole graph does from any cut, and
fused suffixes keep the exported model's layout."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import block_model, random_inputs

import onnx_lapq
from onnx_lapq.evaluator import LossEvaluator
from onnx_lapq.graph import normalize


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (3, 3), (4, 8), (8, 4)])
def test_every_start_cut_gives_the_same_loss_bit_for_bit(bits):
    """A suffix session rounds as the whole graph does: the loss and every cached tensor are
    identical whichever cut an evaluation starts from (each suffix knows the shapes of its
    inputs, so ONNX Runtime fuses its layers as it does in the whole graph)."""
    model = block_model(opset=21)
    calib = random_inputs(model, 48, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], bias_correction=False))
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="mse", fused=bits == (8, 8))
    assert len(evaluator.cuts) > 2
    nodes = list(evaluator.template.graph.node)
    producer = {o: n.op_type for n in nodes for o in n.output}
    residual_adds = [(pos, set(n.input)) for pos, n in enumerate(nodes) if n.op_type == "Add" and any(producer.get(i) == "Conv" for i in n.input)]
    assert residual_adds or evaluator.fused  # fused, a QuantizeLinear follows each convolution
    for cut in evaluator.cuts[1:]:  # ONNX Runtime fuses such an Add into its convolution only when both inputs come from inside the graph
        assert not any(t in inputs for t in cut.live for pos, inputs in residual_adds if pos >= cut.position)
    first_seen: dict[int, list] = {}

    def evaluate() -> float:
        loss = evaluator(result.params)
        for i, cut in enumerate(evaluator.cuts):
            if cut.values is not None:
                for old, new in zip(first_seen.setdefault(i, [list(map(np.copy, v)) for v in cut.values]), cut.values):
                    for a, b in zip(old, new):
                        np.testing.assert_array_equal(a, b)
        return loss

    whole = evaluate()
    for start in range(1, len(evaluator.cuts) + 1):
        for later in evaluator.cuts[start:]:
            later.versions = None  # stale: the evaluation starts at cut start - 1 and refreshes them
        assert evaluate() == whole
    assert len(first_seen) == len(evaluator.cuts) - 1


def _optimized_transposes(model: onnx.ModelProto, path) -> int:
    """Transposes in ONNX Runtime's optimized graph of ``model`` (NHWC layout of the integer kernels)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "Transpose" for n in onnx.load(str(path)).graph.node)


def test_fused_suffixes_run_in_the_exported_layout(tmp_path):
    """Every suffix the fused evaluator runs is laid out like the exported model: no more
    Transposes than the whole model has (a suffix whose NCHW input reaches a convolution and
    a residual Add used to get a Transpose pair around each integer kernel after it)."""
    model = block_model(opset=13)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    evaluator = LossEvaluator(normalize(model), result.plan, calib, result.params, loss="mse", fused=True)
    whole = _optimized_transposes(result.model, tmp_path / "whole.onnx")
    assert any("relu1" in t for c in evaluator.cuts for t in c.live), "no cut before the residual block"
    for i, cut in enumerate(evaluator.cuts):
        suffix = evaluator.suffix(cut, evaluator.cuts[i + 1:i + 2])
        assert _optimized_transposes(suffix, tmp_path / f"suffix{i}.onnx") <= whole
