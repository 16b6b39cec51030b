"""N:M sparsity as a stage: masks in the export, repair, named dense layers, refusals."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnx_lapq
from conftest import DIGITS_CALIB, DIGITS_MODEL, Net, block_model, digits, random_inputs
from onnx_lapq import CalibrationError, ConfigError, QuantConfig
from onnx_lapq.inspect import inspect_model
from onnx_lapq.layerinputs import LayerGram
from onnx_lapq.methods.sparsify import _masked_least_squares
from onnx_lapq import SparsityOptions
from onnx_lapq.unfold import LayerShape


def _run(model, calibration, **options):
    bits = {k: options.pop(k) for k in ("weight_bits", "act_bits") if k in options}
    result = onnx_lapq.quantize(model, calibration, config=QuantConfig(**bits, sparsity=SparsityOptions(pattern="2:4", **options)))
    return result, next(r for r in result.stages if r.stage == "sparsify")


def test_pruned_layers_follow_the_pattern_in_the_export_and_repair_lowers_their_error():
    model, calibration = digits()
    plain, plain_record = _run(model, calibration, repair=False)
    repaired, record = _run(model, calibration)
    facts = {f.node: f for f in inspect_model(repaired.model)}
    pruned = {layer.node for layer in record.layers}
    assert pruned == {"conv2", "conv3a", "conv3b", "conv4"} and dict(record.dense) == {"conv1": "first or last layer", "fc": "first or last layer"}
    for node, fact in facts.items():
        assert (fact.pattern == "2:4") == (node in pruned), fact
        assert fact.weight_bits == 8
    for layer in record.layers:
        assert 0.5 < layer.kept_magnitude < 1 and layer.error_repaired < layer.error_masked
    assert all(layer.error_repaired is None for layer in plain_record.layers)
    assert repaired.fidelity.loss < plain.fidelity.loss


@pytest.mark.parametrize("masks", ["transposable", "transposable-approx"])
def test_transposable_masks_reach_the_export_at_4_bits(masks):
    model, calibration = digits()
    result, record = _run(model, calibration, masks=masks, weight_bits=4, act_bits=8)
    facts = {f.node: f for f in inspect_model(result.model)}
    for layer in record.layers:
        assert (facts[layer.node].pattern, facts[layer.node].transposable, facts[layer.node].weight_bits) == ("2:4", True, 4), layer


def test_layers_the_pattern_does_not_fit_stay_dense_and_are_named():
    model = block_model()
    _, record = _run(model, random_inputs(model, 32, batch=32), dense_first_last=False, dense_layers=("conva",))
    dense = dict(record.dense)
    assert dense["conva"] == "excluded"
    assert dense["conv3"].startswith("a reduction dimension of 54 is not a multiple of M=4")
    assert "conv1" in dense and "fc" not in dense  # conv1: 2 input channels x 9 = 18; fc pruned: first/last not kept dense
    assert "sparsity 2:4 (magnitude)" in record.summary() and "conv3 (a reduction dimension of 54" in record.summary()


def test_masked_least_squares_solves_each_row_on_its_support():
    rng = np.random.default_rng(0)
    d, rows = 12, 5
    x_hat = rng.standard_normal((200, d))
    x = x_hat + 0.1 * rng.standard_normal((200, d))
    gram = LayerGram(LayerShape("MatMul", (d, rows)))
    gram.update(x_hat[None].astype(np.float32)[0], x.astype(np.float32), np.arange(200))
    w = rng.standard_normal((1, rows, d))
    support = rng.random((1, rows, d)) < 0.5
    fitted = _masked_least_squares(w, support, gram, damping=1e-9)
    for r in range(rows):
        keep = support[0, r]
        expected = np.linalg.lstsq(x_hat[:, keep], x @ w[0, r], rcond=None)[0]
        np.testing.assert_allclose(fitted[0, r, keep], expected, rtol=1e-4, atol=1e-6)
        assert (fitted[0, r, ~keep] == 0).all()


def test_bad_patterns_and_repair_without_data_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="0 < N < M"):
        SparsityOptions(pattern="4:4")
    with pytest.raises(ConfigError, match="masks='random' are unknown"):
        SparsityOptions(pattern="2:4", masks="random")
    model, _ = digits()
    with pytest.raises(CalibrationError, match="sparsity repair"):
        onnx_lapq.quantize(model, None, config=QuantConfig(weight_only=True, sparsity=SparsityOptions(pattern="2:4")))
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_lapq", str(DIGITS_MODEL), str(out), "--calib", str(DIGITS_CALIB), "--sparsity", "2:x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not N:M" in proc.stderr and not out.exists()


def test_an_unstructured_sparse_model_converts_to_n_m_keeping_more_of_its_magnitude():
    """Half of conv4's weights already zero (the smallest, anywhere): its 2:4 mask keeps more of
    |w| than the dense layer's, and the export follows 2:4."""
    model, calibration = digits()
    dense_kept = {layer.node: layer.kept_magnitude for layer in _run(model, calibration, repair=False)[1].layers}
    weight = next(t for t in model.graph.initializer if t.name == "conv4.weight")  # BatchNorm folds into it: zeros stay zeros
    values = onnx.numpy_helper.to_array(weight)
    values = np.where(np.abs(values) > np.median(np.abs(values)), values, 0).astype(np.float32)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    result, record = _run(model, calibration, repair=False)
    kept = {layer.node: layer.kept_magnitude for layer in record.layers}
    assert kept["conv4"] > dense_kept["conv4"] + 0.05
    assert {f.node: f.pattern for f in inspect_model(result.model)}["conv4"] == "2:4"


def test_a_pruned_model_searched_by_lapq_exports_the_loss_the_search_reported():
    model, calibration = digits()
    config = QuantConfig(weight_bits=4, act_bits=4, method="lapq", weights="nearest", sparsity=SparsityOptions(pattern="2:4"),
                         lapq=onnx_lapq.LapqOptions(max_evals=30))
    result = onnx_lapq.quantize(model, calibration, config=config)
    assert result.report["exported_loss"] == pytest.approx(result.report["final_loss"], rel=1e-5)
    pruned = {layer.node for layer in next(r for r in result.stages if r.stage == "sparsify").layers}
    assert all(f.pattern == "2:4" for f in inspect_model(result.model) if f.node in pruned) and pruned


@pytest.mark.parametrize("solver", ["gptq", "adaround"])
def test_reconstruction_of_pruned_layers_keeps_their_zeros(solver):
    """The solvers know the mask: pruned entries stay at the zero code (gptq spreads their error
    over the kept columns), and the reconstruction still fits better than rounding."""
    model, calibration = digits()
    config = QuantConfig(weight_bits=3, act_bits=8, weights=solver, sparsity=SparsityOptions(pattern="2:4"))
    result = onnx_lapq.quantize(model, calibration, config=config)
    pruned = {layer.node for layer in next(r for r in result.stages if r.stage == "sparsify").layers}
    facts = {f.node: f for f in inspect_model(result.model)}
    assert pruned and all(facts[node].pattern == "2:4" for node in pruned)
    for tensor, mask in result.solution.masks.items():  # the solver's own answer, before the Solution masks it
        assert (result.solution.weights[tensor][~mask] == 0).all() and mask.mean() == 0.5
    layers = [layer for layer in next(r for r in result.stages if r.stage == solver).layers if layer.node in pruned]
    assert sum(layer.error_reconstructed for layer in layers) < 0.9 * sum(layer.error_nearest for layer in layers)


def test_weight_only_blocks_of_a_pruned_model_are_symmetric_so_a_pruned_weight_is_the_code_0():
    net = Net(np.random.default_rng(7))
    net.matmul("fc1", "x", 64, 32)
    net.matmul("fc2", net.op("Relu", "relu", ["fc1"]), 32, 32)
    net.matmul("fc3", "fc2", 32, 8)
    model = net.model([("x", onnx.TensorProto.FLOAT, ["N", 64])], [("fc3", onnx.TensorProto.FLOAT, ["N", 8])])
    config = QuantConfig(weight_only=True, weight_bits=4, sparsity=SparsityOptions(pattern="2:4", repair=False))
    assert config.symmetric_weights and not QuantConfig(weight_only=True).symmetric_weights
    result = onnx_lapq.quantize(model, None, config=config)
    facts = {f.node: f for f in inspect_model(result.model)}
    assert facts["fc2"].pattern == "2:4" and facts["fc2"].granularity == "blocks of 32"
    stored = {t.name: onnx.numpy_helper.to_array(t).astype(np.int64) for t in result.model.graph.initializer if t.name.startswith("fc2")}
    codes = next(v for name, v in stored.items() if name.endswith("_quantized"))
    assert (codes == 0).mean() >= 0.5 and all(not np.any(v) for name, v in stored.items() if name.endswith("zero_point"))
