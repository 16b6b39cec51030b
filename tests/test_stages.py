"""The method seam: the stages a config asks for, and stages that change the Solution's numbers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_lapq
from conftest import DIGITS_CALIB, DIGITS_MODEL
from onnx_lapq import methods, pipeline
from onnx_lapq.bits import LayerBits
from onnx_lapq.methods import StageRecord
from onnx_lapq.methods.calibrators import Calibrate


def digits():
    return onnx.load(DIGITS_MODEL), [{"input": np.load(DIGITS_CALIB)["input"][:64]}]


@pytest.mark.parametrize("config, names", [
    (onnx_lapq.QuantConfig(), ["bias_correction", "minmax"]),
    (onnx_lapq.QuantConfig(method="entropy", bias_correction=False), ["entropy"]),
    (onnx_lapq.QuantConfig(method="lapq"), ["bias_correction", "lapq"]),
])
def test_a_config_names_its_stages_in_order(config, names):
    assert [stage.name for stage in methods.stages(config)] == names


@dataclass(frozen=True)
class Change:
    """A test stage that observes nothing and maps the Solution with ``change(context, solution)``,
    the way a reconstruction, sparsity or mixed-precision method would."""

    name: str
    change: Callable
    keeps_batches: bool = False

    def observers(self, plan, config):
        return {}

    def run(self, context, solution):
        return self.change(context, solution), StageRecord(stage=self.name)


def _prune_half(context, solution):
    """Masks the smaller half of every weight."""
    weights = {w.tensor: np.abs(solution.weights[w.tensor]) for w in context.plan.weights}
    return solution.but(masks={t: w >= np.median(w) for t, w in weights.items()})


def _weight_codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0][: -len("_quantized")]: inits[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and inits[n.input[0]].dtype == np.int8}


def test_a_stage_that_masks_weights_exports_exact_zeros(monkeypatch):
    """Masks in the Solution reach the exported integers: every pruned weight is code 0, and the
    later calibrator clips the masked weights, so the kept ones keep their full grid."""
    monkeypatch.setattr(pipeline, "stages", lambda config: [Change("prune_half", _prune_half), Calibrate("minmax")])
    model, calib = digits()
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    codes = _weight_codes(result.model)
    assert codes and set(codes) == set(result.solution.masks)
    for tensor, mask in result.solution.masks.items():
        assert np.all(codes[tensor][~mask] == 0) and np.count_nonzero(codes[tensor][mask]) > 0.9 * mask.sum()
        assert np.abs(codes[tensor]).max() == 127  # scales from the masked weights: the largest kept weight is on the grid's end
    assert [r.stage for r in result.stages] == ["prune_half", "minmax"]
    assert set(result.report["seconds"]) >= {"prune_half", "minmax"}


def test_observers_of_all_stages_are_collected_in_one_pass(monkeypatch):
    """The pipeline asks every stage for its observers and runs one pass for their union."""
    seen = []

    @dataclass(frozen=True)
    class NeedsMeans:
        name: str = "needs_means"
        keeps_batches: bool = False

        def observers(self, plan, config):
            return {plan.biases[0].input_tensor: frozenset({"channel_mean"})}

        def run(self, context, solution):
            seen.append(context.stats.channel_mean(context.plan.biases[0].input_tensor))
            return solution, StageRecord(stage=self.name)

    monkeypatch.setattr(pipeline, "stages", lambda config: [NeedsMeans(), Calibrate("minmax")])
    model, calib = digits()
    onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    first_input = calib[0]["input"]
    assert seen and seen[0].shape == (first_input.shape[1],)
    assert np.allclose(seen[0], first_input.mean(axis=(0, 2, 3)), atol=1e-5)  # the first layer reads the model input


def test_bias_correction_is_a_stage_whose_means_the_export_applies():
    """With the bias-correction stage the Solution holds the layers' input means and the exported
    biases differ from the float ones; without it they are the float biases on the int32 grid."""
    model, calib = digits()
    on = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=8, weights="nearest"))
    off = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=8, weights="nearest", bias_correction=False))
    assert on.solution.input_means and off.solution.input_means is None
    assert {b.input_tensor for b in on.plan.biases} == set(on.solution.input_means)
    values_on = on.solution.values(on.plan, on.params)
    values_off = off.solution.values(off.plan, off.params)
    bias = on.plan.biases[0].tensor
    assert not np.array_equal(values_on[bias], values_off[bias]) and np.array_equal(values_off[bias], off.solution.weights[bias])


def test_a_stage_that_chooses_widths_makes_the_run_plan_again(monkeypatch):
    """W3A8 everywhere, then a stage sets conv3a's weights to 8 bits: the later stages and the
    export see the new plan, where conv3a runs at 8/8 and so gets an output site, observed in a
    second pass; the result equals a run configured with that width from the start."""
    model, calib = digits()
    config = onnx_lapq.QuantConfig(weight_bits=3, act_bits=8, bias_correction=False, weights="nearest")
    monkeypatch.setattr(pipeline, "stages", lambda config: [Change("widen_conv3a", lambda c, s: s.but(layer_bits=(LayerBits("conv3a", weight_bits=8),)), keeps_batches=True),
                                                        Calibrate("minmax")])
    chosen = onnx_lapq.quantize(model, calib, config=config)
    monkeypatch.undo()
    configured = onnx_lapq.quantize(model, calib, config=dataclasses.replace(config, layer_bits={"conv3a": {"weight_bits": 8}}))
    uniform = onnx_lapq.quantize(model, calib, config=config)
    bits = {w.node: w.bits for w in chosen.plan.weights}
    assert bits["conv3a"] == 8 and {b for n, b in bits.items() if n != "conv3a"} == {3}
    assert len(chosen.plan.activations) == len(uniform.plan.activations) + 1  # conv3a's output site
    assert chosen.model.SerializeToString() == configured.model.SerializeToString()


def _negate_fc(context, solution):
    return solution.but(weights={**solution.weights, "fc.weight": -solution.weights["fc.weight"]})


def test_new_weight_values_from_a_stage_are_what_the_export_quantizes(monkeypatch):
    """A stage's new float weights are the values every later stage and the export take."""
    model, calib = digits()
    config = onnx_lapq.QuantConfig(bias_correction=False)
    plain = _weight_codes(onnx_lapq.quantize(model, calib, config=config).model)
    monkeypatch.setattr(pipeline, "stages", lambda config: [Change("negate_fc", _negate_fc), Calibrate("minmax")])
    negated = _weight_codes(onnx_lapq.quantize(model, calib, config=config).model)
    assert np.array_equal(negated["fc.weight"], -plain["fc.weight"])
    assert all(np.array_equal(negated[t], plain[t]) for t in plain if t != "fc.weight")


def test_every_method_a_config_accepts_has_its_stage():
    assert set(methods.CLIPPING) == set(onnx_lapq.config.CALIBRATION_METHODS)


def test_widths_chosen_after_the_ranges_are_refused(monkeypatch):
    """Ranges chosen on the old plan do not fit the new one: a stage that sets widths after the
    clipping stage is a ConfigError naming it, not a crash or a silently wrong export."""
    monkeypatch.setattr(pipeline, "stages", lambda config: [
        Calibrate("minmax"), Change("widen_conv3a", lambda c, s: s.but(layer_bits=(LayerBits("conv3a", weight_bits=8),)), keeps_batches=True)])
    with pytest.raises(onnx_lapq.ConfigError, match="'widen_conv3a' chose bit-widths after ranges"):
        onnx_lapq.quantize(*digits(), config=onnx_lapq.QuantConfig(weight_bits=3, act_bits=8, bias_correction=False))


def test_widths_a_stage_chooses_go_over_the_configs_entry_by_entry(monkeypatch):
    """The config's own per-layer widths stay where the stage names other layers, and the
    result's config holds the widths the model was made with."""
    monkeypatch.setattr(pipeline, "stages", lambda config: [
        Change("widen_conv3a", lambda c, s: s.but(layer_bits=(LayerBits("conv3a", weight_bits=8),)), keeps_batches=True), Calibrate("minmax")])
    config = onnx_lapq.QuantConfig(weight_bits=3, act_bits=8, bias_correction=False, layer_bits={"fc": {"weight_bits": 4}})
    result = onnx_lapq.quantize(*digits(), config=config)
    bits = {w.node: w.bits for w in result.plan.weights}
    assert bits["conv3a"] == 8 and bits["fc"] == 4 and bits["conv1"] == 3
    assert {e.node for e in result.config.layer_bits} == {"conv3a", "fc"}
