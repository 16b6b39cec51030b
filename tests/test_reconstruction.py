"""Weight reconstruction as a stage: what it changes, what later stages keep, what the export holds."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_lapq
from conftest import Net, block_model, digits, random_inputs
from onnx import TensorProto
from onnx_lapq import ConfigError, LapqOptions, QuantConfig, ReconstructionOptions, methods
from onnx_lapq.layerinputs import InputCollector, LayerInput, prefix
from onnx_lapq.unfold import LayerShape
from onnx_lapq.layerinputs import waves as layer_waves
from onnx_lapq.plan import build_plan
from onnx_lapq.qmath import quantize as codes_of
from onnx_lapq.runtime import session


def _depthwise_model():
    """x -> conv1 -> Relu -> depthwise 3x3 (group 6) -> Relu -> pointwise 1x1 -> Relu -> Flatten -> Gemm."""
    net = Net(np.random.default_rng(5))
    h = net.op("Relu", "relu1", [net.conv("conv1", "x", 3, 6)])
    net.inits["dw_W"] = (net.rng.standard_normal((6, 1, 3, 3)) / 3).astype(np.float32)
    net.inits["dw_B"] = (0.1 * net.rng.standard_normal(6)).astype(np.float32)
    net.nodes.append(onnx.helper.make_node("Conv", [h, "dw_W", "dw_B"], ["dw"], name="dw", group=6, pads=[1] * 4, kernel_shape=[3, 3]))
    h = net.op("Relu", "relu2", ["dw"])
    h = net.op("Relu", "relu3", [net.conv("pw", h, 6, 8, k=1, pad=0)])
    net.gemm("fc", net.op("Flatten", "flat", [h], axis=1), 8 * 8 * 8, 10)
    return net.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [("fc", TensorProto.FLOAT, ["N", 10])])


def _record(result, stage="gptq"):
    return next(r for r in result.stages if r.stage == stage)


SOLVERS = ("gptq", "adaround")


def test_config_puts_reconstruction_between_bias_correction_and_clipping():
    names = [s.name for s in methods.stages(QuantConfig(weights="gptq", method="lapq"))]
    assert names == ["bias_correction", "gptq", "lapq"]
    with pytest.raises(ConfigError, match="weights='adaround2' is unknown"):
        QuantConfig(weights="adaround2")
    with pytest.raises(ConfigError, match="ReconstructionOptions"):
        QuantConfig(damping=0.1)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("build", [_depthwise_model, block_model])
def test_every_layer_fits_its_inputs_better_than_rounding_and_the_export_holds_the_solution(build, solver):
    model = build()
    calibration = random_inputs(model, 96, batch=32)
    config = QuantConfig(weight_bits=3, act_bits=8, weights=solver, method="mse")
    result = onnx_lapq.quantize(model, calibration, config=config)
    record = _record(result, solver)
    assert len(record.layers) == len(result.plan.weights) and not record.skipped
    for layer in record.layers:
        assert layer.error_reconstructed <= layer.error_nearest, layer
    assert sum(layer.error_reconstructed for layer in record.layers) < 0.8 * sum(layer.error_nearest for layer in record.layers)
    # the exported integer weights are the reconstructed ones, on the grid the stage fixed
    exported = {t.name: t for t in result.model.graph.initializer}
    for site in result.plan.weights:
        qp = result.params[site.tensor]
        stored = numpy_helper.to_array(exported[f"{site.tensor}_quantized"]).astype(np.int64)
        np.testing.assert_array_equal(stored, codes_of(result.solution.weights[site.tensor], qp.scale, qp.zero_point, qp.fmt, qp.axis))
        lo, hi = result.solution.weight_grids[site.tensor]
        assert np.all(np.abs(result.solution.weights[site.tensor]) <= np.broadcast_to(np.maximum(-lo, hi), qp.scale.shape).reshape(
            (-1,) + (1,) * (result.solution.weights[site.tensor].ndim - 1)) + 1e-6)


def test_held_out_samples_judge_the_fit_where_it_learns_their_noise():
    """A quarter of the samples stays out of the fit.  The last layer (512 inputs, 96 samples)
    fits its own samples almost exactly, which says nothing: on held-out samples its error is
    many times higher, and that is the error reported."""
    model = _depthwise_model()
    calibration = random_inputs(model, 96, batch=32)
    records = {}
    for held_out in (0, 4):
        config = QuantConfig(weight_bits=3, act_bits=8, weights="gptq", method="mse", reconstruction=ReconstructionOptions(held_out=held_out))
        records[held_out] = {layer.node: layer for layer in _record(onnx_lapq.quantize(model, calibration, config=config)).layers}
    assert all(layer.held_out == 0 for layer in records[0].values())
    assert records[4]["conv1"].held_out * 3 == records[4]["conv1"].sampled  # every 4th sample, all 64 positions of each
    assert records[4]["fc"].held_out == 24 and records[4]["fc"].sampled == 72
    assert 10 * records[0]["fc"].error_reconstructed < records[4]["fc"].error_reconstructed < records[4]["fc"].error_nearest
    with pytest.raises(ConfigError, match="held_out=1"):
        ReconstructionOptions(held_out=1)


def test_reconstruction_lowers_the_loss_at_low_bits_on_the_digits_cnn():
    model, calibration = digits()
    losses = {}
    for weights in ("nearest", "gptq"):
        config = QuantConfig(weight_bits=2, act_bits=4, method="lapq", weights=weights, lapq=LapqOptions(max_evals=40))
        result = onnx_lapq.quantize(model, calibration, config=config)
        losses[weights] = result.exported_loss
        assert result.exported_loss == pytest.approx(_record(result, "lapq").outcome.search.fun, rel=1e-6)
    assert losses["gptq"] < 0.5 * losses["nearest"]


def test_lapq_after_reconstruction_searches_activations_only_and_keeps_the_weight_grids():
    model, calibration = digits()
    config = QuantConfig(weight_bits=4, act_bits=4, method="lapq", weights="gptq", lapq=LapqOptions(max_evals=30))
    result = onnx_lapq.quantize(model, calibration, config=config)
    start = result.start_params
    for site in result.plan.weights:
        np.testing.assert_array_equal(result.params[site.tensor].scale, start[site.tensor].scale)
    assert len(_record(result, "lapq").outcome.search.x) == len(result.plan.groups)  # one coordinate per activation group
    assert [layer["node"] for layer in result.report["reconstruction"]["layers"]] == [s.node for s in result.plan.weights]


def test_statistics_correction_is_an_option_and_moves_only_biases():
    model = _depthwise_model()
    calibration = random_inputs(model, 64, batch=32)
    runs = {}
    for on in (True, False):
        config = QuantConfig(weight_bits=3, weights="gptq", bias_correction=False, reconstruction=ReconstructionOptions(statistics_correction=on))
        runs[on] = onnx_lapq.quantize(model, calibration, config=config)
    plan = runs[True].plan
    changed = [b.tensor for b in plan.biases if not np.array_equal(runs[True].solution.weights[b.tensor], runs[False].solution.weights[b.tensor])]
    assert changed  # correction moved biases
    for bias in plan.biases:
        np.testing.assert_array_equal(runs[False].solution.weights[bias.tensor], numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == bias.tensor)))


def test_reconstruction_is_deterministic_and_its_sampling_bounded():
    model = _depthwise_model()
    calibration = random_inputs(model, 64, batch=16)
    config = QuantConfig(weight_bits=4, weights="gptq", reconstruction=ReconstructionOptions(max_columns=256))
    first = onnx_lapq.quantize(model, calibration, config=config)
    second = onnx_lapq.quantize(model, calibration, config=config)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    for layer in _record(first).layers:
        assert layer.sampled <= 256 + 16 and layer.sampled <= layer.positions
    assert first.report["reconstruction"]["solver"] == "gptq"


def test_layers_whose_inputs_do_not_depend_on_each_other_share_a_pass():
    model = onnx_lapq.graph.normalize(block_model())
    plan = build_plan(model, QuantConfig(weight_bits=4))
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    waves = [[s.node for s in wave] for wave in layer_waves(model, sorted(plan.weights, key=lambda s: order[s.node]))]
    assert ["conva", "convb"] in waves
    assert sum(len(w) for w in waves) == len(plan.weights) == len(waves) + 1


def test_prefix_keeps_only_what_the_outputs_need():
    model = block_model()
    cut = prefix(model, ["relu2"])
    assert {n.name for n in cut.graph.node} == {"conv1", "relu1", "conv2", "add", "relu2"}
    assert {t.name for t in cut.graph.initializer} == {"conv1_W", "conv1_B", "conv2_W", "conv2_B"}
    feeds = random_inputs(model, 4)[0]
    np.testing.assert_array_equal(session(cut).run(["relu2"], feeds)[0], session(model, outputs=["relu2"]).run(["relu2"], feeds)[0])


def test_kept_frontiers_give_the_statistics_of_whole_runs():
    """Waves that run only the graph between frontiers see what runs from the inputs see."""
    model = onnx_lapq.graph.normalize(block_model())
    batches = random_inputs(model, 48, batch=16)
    plan = build_plan(model, QuantConfig(weight_bits=4))
    nodes = {n.name: n for n in model.graph.node}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    waves = layer_waves(model, sorted(plan.weights, key=lambda s: order[s.node]))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    results = {}
    for budget in (0, 1 << 30):
        collector = InputCollector(model, batches, max_columns=10_000, seed=0, cache_bytes=budget, held_out=4)
        grams = []
        for wave in waves:
            wanted = [LayerInput(s.node, LayerShape.of(nodes[s.node], weights[s.tensor].shape), nodes[s.node].input[0], nodes[s.node].input[0]) for s in wave]
            grams += collector.collect(model, wanted)
        results[budget] = grams
        assert (collector.frontiers["float"].values is None) == (budget == 0)
    for cached_pair, whole_pair in zip(results[1 << 30], results[0]):
        for cached, whole in zip(cached_pair, whole_pair):  # the fit's statistics and the held-out ones
            assert cached.sampled == whole.sampled > 0
            for key in ("hessian", "cross", "quantized_mean"):
                np.testing.assert_allclose(cached.mean(key), whole.mean(key), rtol=1e-5, atol=1e-6)


def test_waves_from_kept_frontiers_reconstruct_as_waves_from_the_inputs():
    model, calibration = digits()
    results = []
    for budget in (0, 1024):
        config = QuantConfig(weight_bits=2, act_bits=4, method="minmax", weights="gptq", reconstruction=ReconstructionOptions(cache_budget_mb=budget))
        results.append(_record(onnx_lapq.quantize(model, calibration, config=config)))
    for cached, whole in zip(results[1].layers, results[0].layers):
        assert cached.error_reconstructed == pytest.approx(whole.error_reconstructed, rel=1e-3)
        assert cached.error_nearest == pytest.approx(whole.error_nearest, rel=1e-3)


def test_weight_only_reconstruction_fits_blockwise_matmul_weights():
    """--weight-only --weights gptq: MatMul weights in blocks, inputs float, reconstructed from
    the calibration data (which a weight-only reconstruction needs)."""
    net = Net(np.random.default_rng(7))
    h = net.op("Relu", "relu1", [net.matmul("mm1", "x", 64, 64)])
    net.matmul("mm2", h, 64, 32)
    model = net.model([("x", TensorProto.FLOAT, ["N", 5, 64])], [("mm2", TensorProto.FLOAT, ["N", 5, 32])], opset=21)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((64, 64)).astype(np.float32) / 8
    calibration = [{"x": (rng.standard_normal((32, 5, 64)).astype(np.float32) @ mix)} for _ in range(2)]
    config = QuantConfig(weight_bits=3, weight_only=True, weights="gptq", block_size=16)
    result = onnx_lapq.quantize(model, calibration, config=config)
    record = _record(result)
    assert [layer.node for layer in record.layers] == ["mm1", "mm2"]
    assert all(layer.error_reconstructed < 0.8 * layer.error_nearest for layer in record.layers), record.layers
    assert all(result.params[w.tensor].block_size == 16 for w in result.plan.weights)
    with pytest.raises(onnx_lapq.CalibrationError, match="weights='gptq' reconstructs"):
        onnx_lapq.quantize(model, None, config=config)


def test_qdrop_mixes_the_gram_matrices_as_sampled_mixed_inputs_do():
    from onnx_lapq.methods.reconstruction import _dropped
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200_000, 4))
    x_hat = x + 0.3 * rng.standard_normal(x.shape)
    mask = rng.random(x.shape) < 0.6  # quantized with probability 0.6
    mixed = np.where(mask, x_hat, x)
    gram = lambda a, b: (a.T @ b / len(a))[None]
    hessian, cross, _ = _dropped(gram(x_hat, x_hat), gram(x_hat, x), gram(x, x), 0.4)
    np.testing.assert_allclose(hessian, gram(mixed, mixed), atol=0.02)
    np.testing.assert_allclose(cross, gram(mixed, x), atol=0.02)


def test_a_layer_that_does_not_unfold_is_rounded_to_nearest_and_named():
    net = Net(np.random.default_rng(9))
    h = net.op("Relu", "relu1", [net.conv("conv1", "x", 3, 4)])
    net.inits["up_W"] = (net.rng.standard_normal((4, 2, 2, 2)) / 4).astype(np.float32)
    net.nodes.append(onnx.helper.make_node("ConvTranspose", [h, "up_W"], ["up"], name="up", strides=[2, 2]))
    net.conv("conv2", net.op("Relu", "relu2", ["up"]), 2, 3)
    model = net.model([("x", TensorProto.FLOAT, ["N", 3, 6, 6])], [("conv2", TensorProto.FLOAT, ["N", 3, 12, 12])])
    result = onnx_lapq.quantize(model, random_inputs(model, 32), config=QuantConfig(weight_bits=4, weights="gptq"))
    record = _record(result)
    assert record.skipped == (("up", "ConvTranspose is not unfolded"),)
    assert [layer.node for layer in record.layers] == ["conv1", "conv2"]
    assert "up_W" not in result.solution.weight_grids and {"conv1_W", "conv2_W"} <= set(result.solution.weight_grids)
    assert "1 rounded to nearest" in record.summary()
