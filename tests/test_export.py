"""Export: the QDQ model runs in ONNX Runtime and computes what the parameters say it should.

The reference is an independent numpy re-computation of the float network with
qmath.fake_quantize applied to each weight, bias (int32, scale s_in * s_w) and
activation site, using only ``result.plan`` and ``result.params``.  Also: ORT-style names
and types, the export check that refuses a model ONNX Runtime's optimizations change, and
biases (corrected ones remove the mean output shift; ones too large for int32 grow their
layer's weight scales).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import (
    DIGITS_CALIB, DIGITS_MODEL, Net, block_model, make_model, conv_chain_model, init_array, initializer, numpy_forward, ort_run, random_inputs, with_outputs,
)
from onnx_lapq import ExportError, QuantConfig, quantize
from onnx_lapq.export import export_qdq
from onnx_lapq.graph import normalize
from onnx_lapq.qmath import fake_quantize
from onnx_lapq.verify import check_exported

CONFIGS = {
    "w8a8": dict(),
    "w8a8-per-tensor": dict(per_channel=False),
    "w8a8-asym-weights": dict(weight_symmetric=False),
    "w8a8-sym-acts": dict(act_symmetric=True),
    "w4a4": dict(weight_bits=4, act_bits=4),
    "w4a4-per-tensor": dict(weight_bits=4, act_bits=4, per_channel=False),
    "w3a3": dict(weight_bits=3, act_bits=3),
    "w2a2": dict(weight_bits=2, act_bits=2),
    "w4a8": dict(weight_bits=4, act_bits=8),
    "w2a8": dict(weight_bits=2, act_bits=8),
    "w16a16": dict(weight_bits=16, act_bits=16),
}


def quantized(model_fn, name, **extra):
    """The model and its quantization; bias correction off, so biases are the float ones on their int32 grid."""
    config = QuantConfig(**{"bias_correction": False, **CONFIGS[name], **extra})
    model = model_fn(opset=21 if config.needs_opset21 else 13)
    return model, quantize(model, random_inputs(model, 64, batch=16), config=config)


def simulate(model, result, feeds):
    """The float network with every quantized tensor replaced by its fake-quantized value."""
    params = result.params
    values = result.solution.values(result.plan, params)  # the weights the methods chose, the biases they corrected
    constants = {}
    for site in list(result.plan.weights) + list(result.plan.biases):
        qp = params[site.tensor]
        constants[site.tensor] = fake_quantize(values[site.tensor], qp.scale, qp.zero_point, qp.fmt, qp.axis)
    acts = {a.tensor for a in result.plan.activations}

    def hook(name, value):
        if name not in acts:
            return value
        qp = params[name]
        return fake_quantize(value, qp.scale, qp.zero_point, qp.fmt, qp.axis)

    out = model.graph.output[0].name
    return numpy_forward(model, feeds, constants=constants, hook=hook)[out]


# block_model with asymmetric weights is left out: ORT's float Conv (DISABLE_ALL) rounds one convb value to
# the other side of a code boundary than the float64 reference does (a one-code flip, not an export error).
SIM_CASES = [(conv_chain_model, name) for name in CONFIGS] + [(block_model, name) for name in CONFIGS if name != "w8a8-asym-weights"]


@pytest.mark.parametrize("model_fn, name", SIM_CASES, ids=[f"{f.__name__}-{n}" for f, n in SIM_CASES])
def test_ort_output_matches_simulation(model_fn, name):
    model, result = quantized(model_fn, name)
    onnx.checker.check_model(result.model, full_check=True)
    if "sym-acts" in name:  # inside the calibrated range: see test_symmetric_activation_codes_stay_on_grid
        feeds = random_inputs(model, 64)[0]
    else:
        feeds = random_inputs(model, 24, seed=99)[0]
        feeds = {k: v * 1.3 for k, v in feeds.items()}  # some values beyond the calibrated ranges
    expected = simulate(model, result, feeds)
    tol = 1e-4 * float(np.abs(expected).max())
    for optimize in (False, True):  # plain Q/DQ maths, and ORT's fused integer kernels
        got = ort_run(result.model, feeds, optimize=optimize)[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=f"optimize={optimize}")
    # and quantization did something: the float model's output is measurably different
    if "16" not in name:
        assert np.abs(ort_run(model, feeds)[0] - expected).max() > 10 * tol


# --------------------------------------------------------------------------- names and types


@pytest.mark.parametrize("name", ["w8a8", "w4a4", "w3a3"])
def test_ort_style_names(name):
    model, result = quantized(block_model, name)
    graph = result.model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for site in result.plan.weights:
        w = site.tensor
        assert w not in inits  # the float weight is gone
        assert {f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"} <= set(inits)
        dq = nodes[f"{w}_DequantizeLinear"]
        assert list(dq.input) == [f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"]
        assert list(dq.output) == [f"{w}_DequantizeLinear_Output"]
    for site in result.plan.activations:
        t = site.tensor
        q, dq = nodes[f"{t}_QuantizeLinear"], nodes[f"{t}_DequantizeLinear"]
        assert q.input[1:] == [f"{t}_scale", f"{t}_zero_point"] and q.output[0] == f"{t}_QuantizeLinear_Output"
        assert dq.input[0] == f"{t}_QuantizeLinear_Output" and dq.output[0] == f"{t}_DequantizeLinear_Output"
        readers = [n.name for n in graph.node if t in n.input]
        assert readers == [f"{t}_Clip" if f"{t}_Clip" in nodes else f"{t}_QuantizeLinear"]  # every consumer reads the DQ output
        assert initializer(result.model, f"{t}_scale").dims == [] and initializer(result.model, f"{t}_zero_point").dims == []
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)


def test_bias_is_int32_with_scale_s_in_times_s_w():
    _, result = quantized(block_model, "w8a8")
    for bias in result.plan.biases:
        b = bias.tensor
        assert initializer(result.model, f"{b}_quantized").data_type == TensorProto.INT32
        s_in = init_array(result.model, f"{bias.input_tensor}_scale")
        s_w = init_array(result.model, f"{bias.weight_tensor}_scale")
        np.testing.assert_array_equal(init_array(result.model, f"{b}_scale"), (s_in * s_w).astype(np.float32))
        assert not init_array(result.model, f"{b}_zero_point").any()


def test_w8a8_types_and_opset():
    _, result = quantized(conv_chain_model, "w8a8")
    assert {o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")} == {13}
    for site in result.plan.weights:
        assert initializer(result.model, f"{site.tensor}_quantized").data_type == TensorProto.INT8
        codes = init_array(result.model, f"{site.tensor}_quantized")
        assert codes.min() >= -127  # symmetric weights never use -128
    assert initializer(result.model, "relu1_zero_point").data_type == TensorProto.UINT8


def test_w4a4_uses_int4_types_at_opset_21():
    model, result = quantized(conv_chain_model, "w4a4")
    assert {o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert result.model.ir_version >= 10
    for site in result.plan.weights:
        tensor = initializer(result.model, f"{site.tensor}_quantized")
        assert tensor.data_type == TensorProto.INT4
        codes = onnx.numpy_helper.to_array(tensor).astype(np.int64)
        assert codes.min() >= -7 and codes.max() <= 7
        assert codes.max() == 7 or codes.min() == -7  # minmax: some weight reaches the end of the grid
    types = {a.tensor: initializer(result.model, f"{a.tensor}_zero_point").data_type for a in result.plan.activations}
    assert types["x"] == TensorProto.UINT4 and types["relu1"] == TensorProto.UINT4
    wide = [a.tensor for a in result.plan.activations if a.wide]
    assert all(types[t] in (TensorProto.UINT8, TensorProto.INT8) for t in wide)


def _q_outputs(result):
    return {f"{a.tensor}_QuantizeLinear_Output": initializer(result.model, f"{a.tensor}_zero_point").data_type for a in result.plan.activations}


@pytest.mark.parametrize("bits", [2, 3])
def test_narrow_grids_use_8bit_containers_with_clip(bits):
    model, result = quantized(conv_chain_model, f"w{bits}a{bits}")
    graph = result.model.graph
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    for site in result.plan.weights:
        tensor = initializer(result.model, f"{site.tensor}_quantized")
        assert tensor.data_type == TensorProto.INT8
        codes = onnx.numpy_helper.to_array(tensor)
        limit = 2 ** (bits - 1) - 1
        assert codes.min() >= -limit and codes.max() <= limit
    for site in result.plan.activations:
        q = nodes[f"{site.tensor}_QuantizeLinear"]
        assert producer[q.input[0]].op_type == "Clip"
        assert producer[q.input[0]].input[0] == site.tensor
    # every activation code stays on the narrow grid, even for inputs far outside the calibrated range
    outputs = _q_outputs(result)
    probe = with_outputs(result.model, outputs)
    feeds = {k: v * 20 for k, v in random_inputs(model, 16, seed=4)[0].items()}
    values = ort_run(probe, feeds, outputs=list(outputs))
    for (name, elem), codes in zip(outputs.items(), values):
        site = name[: -len("_QuantizeLinear_Output")]
        fmt = result.params[site].fmt
        assert fmt.bits == bits
        assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax, name
        assert codes.max() == fmt.qmax or codes.min() == fmt.qmin  # saturation was reached, so the Clip mattered


@pytest.mark.parametrize("name", ["w8a8", "w4a4"])
def test_symmetric_activation_codes_stay_on_grid(name):
    model, result = quantized(conv_chain_model, name, act_symmetric=True)
    assert result.params["x"].fmt.signed and result.params["x"].fmt.symmetric
    feeds = {k: v * 3 for k, v in random_inputs(model, 24, seed=99)[0].items()}
    dq = "x_DequantizeLinear_Output"
    got = ort_run(with_outputs(result.model, {dq: TensorProto.FLOAT}), feeds, outputs=[dq])[0]
    qp = result.params["x"]
    np.testing.assert_array_equal(got, fake_quantize(feeds["x"], qp.scale, qp.zero_point, qp.fmt))


# --------------------------------------------------------------------------- the export check and biases


def test_optimizer_drift_is_refused_not_exported():
    """The export check refuses a model that ONNX Runtime's optimizations change.  Such a model:
    the digits CNN at W16A16 on plain per-channel weight scales, conv1's bias left float: ONNX
    Runtime's WeightBiasQuantization rewrites that float bias onto the int32 grid s_in * s_w,
    where it overflows."""
    model = normalize(onnx.load(DIGITS_MODEL), min_opset=21)
    calib = dict(np.load(DIGITS_CALIB))
    result = quantize(model, [calib], config=QuantConfig(weight_bits=16, act_bits=16, bias_correction=False))
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    params = dict(result.params)
    for w in result.plan.weights:
        plain = np.abs(floats[w.tensor].reshape(len(floats[w.tensor]), -1)).max(axis=1) / (2**15 - 1)
        params[w.tensor] = dataclasses.replace(params[w.tensor], scale=plain.astype(np.float32))
    for b in result.plan.biases:
        s_b = np.float32(params[b.scale_site].scale) * params[b.weight_tensor].scale
        params[b.tensor] = dataclasses.replace(params[b.tensor], scale=s_b.astype(np.float32))
    exported = export_qdq(model, result.plan, params)
    conv1 = next(b for b in result.plan.biases if b.node == "conv1")
    next(n for n in exported.graph.node if n.name == "conv1").input[2] = "conv1_float_bias"
    exported.graph.initializer.append(onnx.numpy_helper.from_array(floats[conv1.tensor], "conv1_float_bias"))
    with pytest.raises(ExportError, match="graph optimizations change this quantized model's outputs"):
        check_exported(exported, model, calib)
    check_exported(result.model, model, calib)  # the export as made passes


@pytest.mark.parametrize("name", ["w4a8", "w2a8"])
def test_bias_correction_removes_mean_output_shift(name):
    """With corrected biases, each output channel's mean over the calibration data is the
    float layer's mean (a pad-free Conv and a Gemm, so no border terms)."""
    net = Net(np.random.default_rng(3))
    h = net.op("Relu", "r1", [net.conv("c1", "x", 3, 6, pad=0)])
    net.gemm("fc", net.op("Flatten", "flat", [h], axis=1), 6 * 6 * 6, 5)
    model = net.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [("fc", TensorProto.FLOAT, ["N", 5])], opset=21)
    calib = random_inputs(model, 64)
    x = calib[0]["x"] + 0.5  # inputs with a non-zero mean, so a weight error shifts the outputs
    calib = [{"x": x}]
    result = quantize(model, calib, config=QuantConfig(**CONFIGS[name], weights="nearest"))  # bias correction alone
    corrected = {b.tensor: init_array(result.model, f"{b.tensor}_quantized") * init_array(result.model, f"{b.tensor}_scale") for b in result.plan.biases}
    w = fake_quantize(init_array(model, "c1_W"), *(lambda p: (p.scale, p.zero_point, p.fmt, p.axis))(result.params["c1_W"]))
    float_out = numpy_forward(model, {"x": x})["c1"]
    quant_out = numpy_forward(model, {"x": x}, constants={"c1_W": w, "c1_B": corrected["c1_B"]})["c1"]
    uncorrected = numpy_forward(model, {"x": x}, constants={"c1_W": w})["c1"]
    shift = lambda y: np.abs((y - float_out).mean(axis=(0, 2, 3))).max()
    assert shift(uncorrected) > 20 * shift(quant_out)
    assert shift(quant_out) < 1e-3 * np.abs(float_out).mean() + float(np.max(result.params["c1_B"].scale))


def test_sixteen_bit_per_channel_biases_fit_int32_by_growing_weight_scales():
    """At W16A16 per channel, s_in * s_w is too fine for the digits CNN's biases in int32.  A
    float bias is no way out (ONNX Runtime's WeightBiasQuantization requantizes it onto that
    grid, overflowing); the overflowing channels' weight scales grow just enough, the other
    channels keep theirs, and every bias is int32."""
    model = onnx.load(DIGITS_MODEL)
    calib = [{"input": np.load(DIGITS_CALIB)["input"][:64]}]
    result = quantize(model, calib, config=QuantConfig(weight_bits=16, act_bits=16, bias_correction=False))
    producer = {o: n.op_type for n in result.model.graph.node for o in n.output}
    for node in result.model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            assert producer.get(node.input[2]) == "DequantizeLinear", node.name
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in normalize(model).graph.initializer}
    grown = 0
    for bias in result.plan.biases:
        s_in, s_w = float(result.params[bias.scale_site].scale), result.params[bias.weight_tensor].scale.astype(np.float64)
        w = weights[bias.weight_tensor]
        plain = np.abs(w.reshape(len(w), -1)).max(axis=1) / (2**15 - 1)
        needed = 2.0 * np.abs(weights[bias.tensor]) / (s_in * (2**31 - 1))
        assert np.all(s_w >= needed * (1 - 1e-6))
        np.testing.assert_allclose(s_w, np.maximum(plain, needed), rtol=1e-6)
        grown += int(np.sum(needed > plain))
    assert grown > 0


@pytest.mark.parametrize("bias_shape", [(8,), (1,)])
def test_a_broadcast_gemm_bias_widens_every_channel(bias_shape):
    """A Gemm bias of shape (1,) holds for every output channel: with per-channel weights
    too small for it on the int32 grid, every channel's scale grows, as for a full bias."""
    rng = np.random.default_rng(0)
    node = onnx.helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="g", transB=1)
    model = make_model([node], [("x", TensorProto.FLOAT, [None, 16])], [("y", TensorProto.FLOAT, [None, 8])],
                       {"W": (rng.standard_normal((8, 16)) * 1e-3).astype(np.float32), "B": np.full(bias_shape, 50.0, np.float32)})
    x = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    result = quantize(model, [x], config=QuantConfig(weight_bits=16, act_bits=16, bias_correction=False))
    error = np.abs(ort_run(result.model, x)[0] - ort_run(model, x)[0]).mean()
    assert error < 1e-3 * 50

