"""Measured weight sensitivities: one evaluator with dequantized weights, probes equal to exported models."""
from __future__ import annotations

from dataclasses import replace

import pytest

import onnx_lapq
from conftest import digits
from onnx_lapq import QuantConfig
from onnx_lapq.evaluator import LossEvaluator
from onnx_lapq.export import export_qdq
from onnx_lapq.graph import normalize
from onnx_lapq.runtime import session
from onnx_lapq.sensitivity import WeightProbe, pair_interactions, weight_sensitivities


@pytest.fixture(scope="module")
def probed():
    model, calibration = digits()
    batches = [{k: v[i:i + 32] for k, v in calibration[0].items()} for i in range(0, 128, 32)]
    result = onnx_lapq.quantize(model, batches, config=QuantConfig(method="mse"))
    normalized = normalize(model, min_opset=21)  # 4-bit weights in the exported comparisons
    probe = WeightProbe(result.plan, result.solution.ranges, result.solution, "mse", weight_symmetric=True, act_symmetric=False)
    evaluator = LossEvaluator(normalized, result.plan, batches, probe.params(), dequantized_weights=True, solution=result.solution)
    return normalized, result, probe, evaluator


def _exported_loss(probed, widths: dict[str, int]) -> float:
    """The loss of the exported model with those weights at those widths, in its own session."""
    normalized, result, probe, evaluator = probed
    plan = replace(result.plan, weights=tuple(replace(w, bits=widths.get(w.tensor, w.bits)) for w in result.plan.weights))
    return evaluator.measure(session(export_qdq(normalized, plan, probe.params(widths), result.solution)))


def test_narrower_weights_cost_more_and_every_probe_is_the_exported_models_loss(probed):
    _, result, probe, evaluator = probed
    single = weight_sensitivities(evaluator, probe, (2, 4, 6))
    assert set(single) == {w.node for w in result.plan.weights}
    for node, by_bits in single.items():
        assert by_bits[2] > by_bits[6] and by_bits[2] > 0, (node, by_bits)
    site = result.plan.weights[1]
    baseline = evaluator(probe.params())
    assert baseline + single[site.node][4] == pytest.approx(_exported_loss(probed, {site.tensor: 4}), rel=1e-4)


def test_pair_interactions_are_the_joint_probe_less_both_single_ones(probed):
    _, result, probe, evaluator = probed
    single = weight_sensitivities(evaluator, probe, (2,))
    a, b = result.plan.weights[1], result.plan.weights[2]
    pairs = [((a.node, 2), (b.node, 2))]
    interaction = pair_interactions(evaluator, probe, pairs, single)[pairs[0]]
    joint = _exported_loss(probed, {a.tensor: 2, b.tensor: 2}) - evaluator(probe.params())
    assert interaction == pytest.approx(joint - single[a.node][2] - single[b.node][2], rel=1e-3, abs=1e-7)


def test_probes_need_an_evaluator_of_dequantized_weights(probed):
    normalized, result, probe, _ = probed
    model, calibration = digits()
    plain = LossEvaluator(normalized, result.plan, [{k: v[:32] for k, v in calibration[0].items()}], probe.params(), solution=result.solution)
    with pytest.raises(ValueError, match="dequantized_weights=True"):
        weight_sensitivities(plain, probe, (4,))
