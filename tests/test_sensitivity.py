"""Measured weight sensitivities: evaluators with dequantized weights, probes equal to exported models."""
from __future__ import annotations

from dataclasses import replace

import pytest

import onnx_lapq
from conftest import digits
from onnx_lapq import QuantConfig
from onnx_lapq.export import export_qdq
from onnx_lapq.graph import normalize
from onnx_lapq.runtime import session
from onnx_lapq.sensitivity import ProbeJob, WidthProbe, pair_interactions, weight_sensitivities


@pytest.fixture(scope="module")
def probed():
    model, calibration = digits()
    batches = [{k: v[i:i + 32] for k, v in calibration[0].items()} for i in range(0, 128, 32)]
    result = onnx_lapq.quantize(model, batches, config=QuantConfig(method="mse"))
    normalized = normalize(model, min_opset=21)  # 4-bit weights in the exported comparisons
    probe = WidthProbe(result.plan, result.solution.ranges, result.solution, "mse", weight_symmetric=True, act_symmetric=False)
    job = ProbeJob(normalized, probe, batches, "auto", 1 << 30)
    return normalized, result, job, job.open()


def _exported_loss(probed, widths: dict[str, int], solution=None) -> float:
    """The loss of the exported model with those weights at those widths, in its own session."""
    normalized, result, job, opened = probed
    plan = replace(result.plan, weights=tuple(replace(w, bits=widths.get(w.tensor, w.bits)) for w in result.plan.weights))
    return opened.evaluator.measure(session(export_qdq(normalized, plan, job.probe.params(widths), solution or result.solution)))


def test_narrower_weights_cost_more_and_every_probe_is_the_exported_models_loss(probed):
    _, result, job, opened = probed
    single = weight_sensitivities(job, (2, 4, 6))
    assert set(single) == {w.node for w in result.plan.weights}
    for node, by_bits in single.items():
        assert by_bits[2] > by_bits[6] and by_bits[2] > 0, (node, by_bits)
    site = result.plan.weights[1]
    assert opened.baseline + single[site.node][4] == pytest.approx(_exported_loss(probed, {site.tensor: 4}), rel=1e-4)


def test_pair_interactions_are_the_joint_probe_less_both_single_ones(probed):
    _, result, job, opened = probed
    single = weight_sensitivities(job, (2,))
    a, b = result.plan.weights[1], result.plan.weights[2]
    pairs = [((a.node, 2), (b.node, 2))]
    interaction = pair_interactions(job, pairs, single)[pairs[0]]
    joint = _exported_loss(probed, {a.tensor: 2, b.tensor: 2}) - opened.baseline
    assert interaction == pytest.approx(joint - single[a.node][2] - single[b.node][2], rel=1e-3, abs=1e-7)


def test_a_probe_evaluates_the_weight_replaced_for_its_width(probed):
    _, result, job, _ = probed
    site = result.plan.weights[1]
    weight = result.solution.weight(site.tensor) * 0.5  # any other weight: the probe must evaluate it, not the plan's
    opened = replace(job, replaced={(site.tensor, 4): weight}).open()
    solution = result.solution.but(weights={**result.solution.weights, site.tensor: weight})
    assert opened.baseline + opened.increase(((site.tensor, 4),)) == pytest.approx(_exported_loss(probed, {site.tensor: 4}, solution), rel=1e-4)
    assert opened.increase(()) == 0.0  # back at the plan's widths, the plan's weights
