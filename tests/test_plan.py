"""Q/DQ placement (onnx_lapq.plan) on residual, concat and pooling graphs built here."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import Net, block_model, make_model, ort_session, random_inputs, relu6_model
from onnx_lapq import ModelError, QuantConfig, quantize
from onnx_lapq.graph import INT4_OPSET, MIN_OPSET, normalize
from onnx_lapq.plan import build_plan
from onnx_lapq.clip import weight_range
from onnx_lapq.export import export_qdq
from onnx_lapq.params import SiteRanges, qparams
from onnx_lapq.qmath import QFormat
from onnx_lapq.verify import integer_layers

CONVS = ["conv1", "conv2", "conva", "convb", "conv3", "conv4"]


def plan_of(model, **config):
    config = QuantConfig(**config)
    return build_plan(normalize(model, min_opset=INT4_OPSET if config.needs_opset21 else MIN_OPSET), config)


def sites(plan):
    return {a.tensor: (a.role, a.group) for a in plan.activations}


def branch_pool_model():
    """relu1 feeds both a Conv and a MaxPool whose output feeds another Conv (both are input sites)."""
    net = Net(np.random.default_rng(2))
    r1 = net.op("Relu", "relu1", [net.conv("conv1", "x", 2, 4)])
    net.conv("conv2", r1, 4, 3)
    pool = net.op("MaxPool", "pool", [r1], kernel_shape=[2, 2], strides=[2, 2])
    net.conv("conv3", pool, 4, 3)
    return net.model(
        [("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [("conv2", TensorProto.FLOAT, ["N", 3, 8, 8]), ("conv3", TensorProto.FLOAT, ["N", 3, 4, 4])],
    )


# --------------------------------------------------------------------------- activation sites


def test_w8a8_sites_roles_and_groups():
    plan = plan_of(block_model())
    assert sites(plan) == {
        "x": ("input", "x"),
        "relu1": ("input", "relu1"),  # conv2's input (also conv1's fused output: input role wins)
        "conv2": ("output", "conv2"),  # conv2 -> Add: no Relu to fuse, the Add's input closes the group
        "relu2": ("input", "relu2"),
        "relua": ("output", "cat"),  # Concat inputs share the Concat output's parameters
        "relub": ("output", "cat"),
        "cat": ("input", "cat"),
        "relu3": ("output", "relu3"),
        "pool": ("input", "relu3"),  # MaxPool output tied with its input
        "relu4": ("output", "relu4"),
        "flat": ("input", "relu4"),  # Flatten output tied with its input
    }
    assert all(a.bits == 8 and not a.wide for a in plan.activations)
    # graph order, and one group per tunable clip
    assert [a.tensor for a in plan.activations][:3] == ["x", "relu1", "conv2"]
    assert plan.groups == ("x", "relu1", "conv2", "relu2", "cat", "relu3", "relu4")
    assert "fc" not in sites(plan)  # graph outputs stay float
    assert plan.summary() == {"weight_sites": 7, "activation_sites": 11, "activation_groups": 7, "bias_sites": 7}


def test_w4a4_has_only_input_sites():
    plan = plan_of(block_model(opset=13), weight_bits=4, act_bits=4)
    assert {a.tensor for a in plan.activations} == {"x", "relu1", "relu2", "cat", "pool", "flat"}
    assert all(a.role == "input" and a.group == a.tensor and a.bits == 4 for a in plan.activations)
    wide = {a.tensor for a in plan.activations if a.wide}
    assert wide == {"pool", "flat"}  # produced by MaxPool / Flatten: 8-bit containers


def test_maxpool_output_tied_at_8_bits_dropped_at_4_bits():
    plan8 = plan_of(branch_pool_model())
    assert sites(plan8)["pool"] == ("input", "relu1")
    assert sites(plan8)["relu1"] == ("input", "relu1")
    plan4 = plan_of(branch_pool_model(), weight_bits=4, act_bits=4)
    assert set(sites(plan4)) == {"x", "relu1"}  # pool's values are already on relu1's grid
    assert {a.tensor: a.wide for a in plan4.activations} == {"x": False, "relu1": True}


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_sub8_bits_never_get_output_sites(bits):
    plan = plan_of(block_model(), weight_bits=bits, act_bits=bits)
    assert {a.role for a in plan.activations} == {"input"}
    assert all(a.bits == bits for a in plan.activations)


def test_mixed_bits_get_no_output_site():
    plan = plan_of(block_model(), weight_bits=4, act_bits=8)
    assert {a.role for a in plan.activations} == {"input"}


# --------------------------------------------------------------------------- weights and biases


def axes_model(opset=13):
    net = Net(np.random.default_rng(3))
    h = net.gemm("gemm_t", "x", 8, 6, trans_b=1)
    h = net.gemm("gemm_n", h, 6, 5, trans_b=0)
    net.matmul("mm", h, 5, 3)
    return net.model([("x", TensorProto.FLOAT, ["N", 8])], [("mm", TensorProto.FLOAT, ["N", 3])], opset=opset)


def test_weight_axes_per_channel():
    axes = {w.tensor: w.axis for w in plan_of(axes_model()).weights}
    assert axes == {"gemm_t_W": 0, "gemm_n_W": 1, "mm_W": 1}
    conv_axes = {w.tensor: w.axis for w in plan_of(block_model()).weights}
    assert conv_axes == {**{f"{c}_W": 0 for c in CONVS}, "fc_W": 0}


@pytest.mark.parametrize("model_fn", [axes_model, block_model])
def test_per_tensor_gives_axis_none(model_fn):
    plan = plan_of(model_fn(), per_channel=False)
    assert plan.weights and all(w.axis is None for w in plan.weights)


def test_bias_sites_pair_input_and_weight():
    plan = plan_of(block_model())
    biases = {b.tensor: (b.node, b.input_tensor, b.weight_tensor) for b in plan.biases}
    assert biases["conv1_B"] == ("conv1", "x", "conv1_W")
    assert biases["conv3_B"] == ("conv3", "cat", "conv3_W")
    assert biases["fc_B"] == ("fc", "flat", "fc_W")
    assert len(biases) == 7


# --------------------------------------------------------------------------- exclusion and first/last


def test_exclude_by_regex_fullmatch():
    plan = plan_of(block_model(), exclude=("conv[ab]",))
    weights = {w.tensor for w in plan.weights}
    assert weights == {f"{c}_W" for c in CONVS if c not in ("conva", "convb")} | {"fc_W"}
    assert "relu2" not in sites(plan)  # only the excluded convs read it
    # patterns must match the whole name: "conv" alone excludes nothing
    assert len(plan_of(block_model(), exclude=("conv",)).weights) == 7


def test_exclusions_that_match_nothing_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="onnx_lapq.plan"):
        plan_of(block_model(), exclude=("conv", "gemm", "conv[ab]", "Gemm", "Relu"), exclude_op_types=("MatMul",))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5, messages
    assert "'conv' matches no node name" in messages[0] and "'conv.*'" in messages[0] and "spelled 'Conv'" in messages[0]
    assert "'gemm' matches no node name" in messages[1] and "spelled 'Gemm'" in messages[1]
    assert "'Gemm' matches no node name" in messages[2] and "give it as an excluded op type" in messages[2]
    assert "Relu nodes are never quantized" in messages[3]
    assert "no MatMul node" in messages[4]


def test_exclude_by_op_type():
    plan = plan_of(block_model(), exclude_op_types=("Gemm",))
    assert "fc_W" not in {w.tensor for w in plan.weights}
    assert "flat" not in sites(plan)
    assert len(plan.weights) == 6


def test_excluding_everything_is_an_error():
    with pytest.raises(ModelError, match="nothing to quantize"):
        plan_of(block_model(), exclude=(".*",))


def test_model_without_quantizable_ops_is_an_error():
    nodes = [onnx.helper.make_node("Relu", ["x"], ["r"], name="r"), onnx.helper.make_node("Add", ["r", "x"], ["y"], name="add")]
    model = make_model(nodes, [("x", TensorProto.FLOAT, [1, 4])], [("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ModelError):
        plan_of(model)


def test_keep_first_last_8bit():
    plan = plan_of(block_model(), weight_bits=4, act_bits=4, keep_first_last_8bit=True)
    wbits = {w.tensor: w.bits for w in plan.weights}
    assert wbits == {"conv1_W": 8, "fc_W": 8, **{f"{c}_W": 4 for c in CONVS[1:]}}
    abits = {a.tensor: a.bits for a in plan.activations}
    assert abits["x"] == 8 and abits["flat"] == 8
    assert abits["relu1"] == 4 and abits["cat"] == 4 and abits["pool"] == 4


def test_clip_outputs_have_the_clip_max_as_ceiling():
    plan = plan_of(relu6_model())
    assert {g: plan.ceiling(g) for g in plan.groups} == {"x": None, "clip1": 6.0, "clip2": 6.0, "relu3": None}


def test_reads_follow_the_graph_a_layer_input_before_its_weight():
    plan = plan_of(block_model(opset=13), weight_bits=4, act_bits=4)
    assert plan.reads == ("x", "conv1_W", "relu1", "conv2_W", "relu2", "conva_W", "convb_W", "cat", "conv3_W", "pool", "conv4_W", "flat", "fc_W")
    w8a8 = plan_of(block_model(opset=13))
    assert set(w8a8.reads) == {a.tensor for a in w8a8.activations} | {w.tensor for w in w8a8.weights}
    assert w8a8.reads.index("relua") < w8a8.reads.index("relub") < w8a8.reads.index("cat") < w8a8.reads.index("conv3_W")


# --------------------------------------------------------------------------- ONNX Runtime fusion


def optimized_ops(model, tmp_path) -> collections.Counter:
    """Op counts of ONNX Runtime's optimized graph of ``model`` quantized at W8A8."""
    result = quantize(model, random_inputs(model, 32), config=QuantConfig())
    optimized = tmp_path / "optimized.onnx"
    ort_session(result.model, optimize=True, optimized_path=optimized)
    return collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def test_w8a8_fuses_into_integer_kernels(tmp_path):
    ops = optimized_ops(block_model(), tmp_path)
    assert ops["QLinearConv"] + ops["ConvInteger"] == len(CONVS)
    assert ops["QGemm"] + ops["MatMulInteger"] + ops["QLinearMatMul"] == 1
    assert ops["Conv"] == 0 and ops["Gemm"] == 0  # nothing left in float
    assert ops["DequantizeLinear"] == 0


@pytest.mark.parametrize("clip1_top, fused", [(6.0, 4), (7.0, 3)])
def test_integer_layers_counts_the_layers_onnx_runtime_fuses(clip1_top, fused):
    """Every layer of a W8A8 Relu6 model, unless a QuantizeLinear after a Clip(0, 6) covers more
    than [0, 6]: ONNX Runtime then keeps that Clip and runs its convolution in float."""
    model = relu6_model()
    result = quantize(model, random_inputs(model, 32), config=QuantConfig(bias_correction=False))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ranges = SiteRanges(
        activations={**{a["group"]: tuple(a["range"]) for a in result.report["activations"]}, "clip1": (0.0, clip1_top)},
        weights={w.tensor: weight_range(weights[w.tensor], w.axis, QFormat(8, signed=True, symmetric=True), "minmax", 2.0) for w in result.plan.weights},
    )
    params = qparams(result.plan, ranges, weight_symmetric=True, act_symmetric=False)
    assert integer_layers(export_qdq(normalize(model), result.plan, params)) == (fused, 4)


def test_w8a8_axes_model_fuses(tmp_path):
    ops = optimized_ops(axes_model(), tmp_path)
    assert ops["Gemm"] == 0 and ops["MatMul"] == 0


@pytest.mark.parametrize("bits", [4, 16])
def test_dropped_pass_through_site_keeps_its_layers_bias(bits):
    """x -> conv1 -> relu -> {maxpool -> conv2, conv3}: at other than 8 bits the MaxPool output is
    not a site of its own (it is on relu's grid), and conv2's int32 bias uses relu's scale."""
    net = Net(np.random.default_rng(0))
    r = net.op("Relu", "relu", [net.conv("conv1", "x", 2, 4)])
    pooled = net.op("MaxPool", "pool", [r], kernel_shape=[2, 2], strides=[2, 2])
    a = net.op("GlobalAveragePool", "ga", [net.conv("conv2", pooled, 4, 3)])
    b = net.op("GlobalAveragePool", "gb", [net.conv("conv3", r, 4, 3)])
    net.op("Add", "y", [a, b])
    model = net.model([("x", TensorProto.FLOAT, ["N", 2, 8, 8])], [("y", TensorProto.FLOAT, ["N", 3, 1, 1])], opset=21)
    result = quantize(model, random_inputs(model, 16), config=QuantConfig(weight_bits=bits, act_bits=bits))
    assert "pool" not in {s.tensor for s in result.plan.activations}
    bias = next(b for b in result.plan.biases if b.node == "conv2")
    assert bias.input_tensor == "pool" and bias.scale_site == "relu"
    expected = result.params["relu"].scale * result.params["conv2_W"].scale
    np.testing.assert_allclose(result.params["conv2_B"].scale, expected.astype(np.float32))
