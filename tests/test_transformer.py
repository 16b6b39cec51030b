"""Transformers: MatMul sites, symbolic batch/sequence, padding masks, attention, weight-only 4-bit."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from conftest import make_model, ort_session, run_cli
from onnx import TensorProto, helper, numpy_helper

import onnx_lapq
from onnx_lapq.summary import summary
from onnx_lapq import LapqOptions

D, HIDDEN = 16, 64


def transformer_block(seed: int = 0) -> onnx.ModelProto:
    """One single-head encoder block on x[B, T, D] with an attention mask[B, T] (opset 17).

    q, k, v = x W + b;  a = softmax(q k^T / sqrt(D) + (1 - mask) * -1e4) v
    h = LayerNorm(x + a Wo + bo);  y = LayerNorm(h + GELU(h W1 + b1) W2 + b2)
    """
    rng = np.random.default_rng(seed)
    inits, nodes = {}, []

    def weight(name, shape):
        inits[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(name, x, fin, fout):
        inits[f"{name}_b"] = (0.1 * rng.standard_normal(fout)).astype(np.float32)
        return node("Add", [node("MatMul", [x, weight(f"{name}_W", (fin, fout))], f"{name}_mm"), f"{name}_b"], name)

    def layernorm(name, x):
        inits[f"{name}_g"] = rng.uniform(0.8, 1.2, D).astype(np.float32)
        inits[f"{name}_beta"] = (0.1 * rng.standard_normal(D)).astype(np.float32)
        return node("LayerNormalization", [x, f"{name}_g", f"{name}_beta"], name, axis=-1)

    inits.update(scale=np.float32(1 / np.sqrt(D)), one=np.float32(1.0), neg=np.float32(-1e4), half=np.float32(0.5), rsqrt2=np.float32(1 / np.sqrt(2)))
    q, k, v = (linear(n, "x", D, D) for n in ("q", "k", "v"))
    scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], "kT", perm=[0, 2, 1])], "qk"), "scale"], "scores")
    maskf = node("Cast", ["mask"], "maskf", to=TensorProto.FLOAT)
    bias = node("Unsqueeze", [node("Mul", [node("Sub", ["one", maskf], "inv"), "neg"], "maskbias"), "axis1"], "maskbias3")
    inits["axis1"] = np.array([1], np.int64)
    probs = node("Softmax", [node("Add", [scores, bias], "masked")], "probs", axis=-1)
    attn = node("MatMul", [probs, v], "context")
    h = layernorm("ln1", node("Add", ["x", linear("o", attn, D, D)], "res1"))
    up = linear("up", h, D, HIDDEN)
    gelu = node("Mul", [node("Mul", [up, "half"], "gh"), node("Add", ["one", node("Erf", [node("Mul", [up, "rsqrt2"], "gs")], "ge")], "g1")], "gelu")
    y = layernorm("ln2", node("Add", [h, linear("down", gelu, HIDDEN, D)], "res2"))
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D]), helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["B", "T", D])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def padded_batch(n: int, t: int, *, seed: int = 0, pad_value: float = 0.0) -> dict[str, np.ndarray]:
    """n sequences of random length <= t, padded to t; padded positions hold ``pad_value``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, D)).astype(np.float32)
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    x[mask == 0] = pad_value
    return {"x": x, "mask": mask}


@pytest.fixture(scope="module")
def block():
    return transformer_block()


def test_sites_are_weight_matmuls_only_by_default(block):
    result = onnx_lapq.quantize(block, [padded_batch(16, 8)])
    assert {w.node for w in result.plan.weights} == {f"{n}_mm" for n in ("q", "k", "v", "o", "up", "down")}
    assert all(w.axis == 1 for w in result.plan.weights)  # output features of B[K, N]
    inputs = {a.tensor for a in result.plan.activations if a.role == "input"}
    assert inputs == {"x", "context", "ln1", "gelu"}
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["LayerNormalization"] == 2 and ops["Softmax"] == 1 and ops["Erf"] == 1


def test_quantize_attention_adds_both_inputs(block):
    result = onnx_lapq.quantize(block, [padded_batch(16, 8)], config=onnx_lapq.QuantConfig(quantize_attention=True))
    inputs = {a.tensor for a in result.plan.activations if a.role == "input"}
    assert {"q", "kT", "probs", "v"} <= inputs


@pytest.mark.parametrize("bits", [8, 4])
def test_symbolic_batch_and_sequence_survive(block, bits):
    result = onnx_lapq.quantize(block, [padded_batch(16, 8)], config=onnx_lapq.QuantConfig(weight_bits=bits, act_bits=bits))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input]
    assert dims == [["B", "T", D], ["B", "T"]]
    float_sess, quant_sess = ort_session(block), ort_session(result.model)
    for n, t in [(1, 3), (5, 11), (2, 32)]:
        feeds = padded_batch(n, t, seed=n + t)
        ref, out = float_sess.run(None, feeds)[0], quant_sess.run(None, feeds)[0]
        assert out.shape == (n, t, D)
        assert np.abs(out - ref).mean() < (0.05 if bits == 8 else 0.5) * np.abs(ref).mean()


def test_padding_does_not_widen_ranges(block):
    data = [padded_batch(32, 8, pad_value=50.0)]
    masked = onnx_lapq.quantize(block, data).report
    unmasked = onnx_lapq.quantize(block, data, config=onnx_lapq.QuantConfig(mask_input=None)).report
    x_masked = next(a["range"] for a in masked["activations"] if a["tensor"] == "x")
    x_unmasked = next(a["range"] for a in unmasked["activations"] if a["tensor"] == "x")
    real = data[0]["x"][data[0]["mask"] == 1]
    assert x_masked == pytest.approx([float(real.min()), float(real.max())], rel=1e-6)
    assert x_unmasked[1] == pytest.approx(50.0)


@pytest.mark.slow
def test_calibration_folder_with_different_lengths(block, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, t in enumerate((5, 9, 16)):
        np.savez(folder / f"part{i}.npz", **padded_batch(8, t, seed=i))
    model_path, out = tmp_path / "block.onnx", tmp_path / "q.onnx"
    onnx.save(block, model_path)
    proc = run_cli(model_path, out, "--calib", folder)
    assert proc.returncode == 0, proc.stderr
    assert "24 calibration samples" in proc.stdout


@pytest.mark.slow
def test_embedding_loss_is_mse_and_lapq_lowers_it(block):
    config = onnx_lapq.QuantConfig(weight_bits=4, act_bits=4, method="lapq", lapq=LapqOptions(max_evals=60))
    report = onnx_lapq.quantize(block, [padded_batch(32, 8)], config=config).report
    assert report["loss"] == "mse"
    assert report["final_loss"] < report["init_loss"]
    assert report["exported_loss"] == pytest.approx(report["final_loss"], rel=0.01)


def float_stream_model(layers: int = 4, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """b = 0.1 x (float, made once);  h0 = x;  h_i = h_(i-1) + h_(i-1) W_i + b: like the
    attention-mask bias of all-MiniLM-L6-v2, b is float and read by every layer, so it
    crosses every point of the quantized graph."""
    rng = np.random.default_rng(seed)
    inits = {"tenth": np.float32(0.1)}
    nodes = [helper.make_node("Mul", ["x", "tenth"], ["b"], name="side")]
    for i in range(1, layers + 1):
        h = "x" if i == 1 else f"h{i - 1}"
        inits[f"W{i}"] = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", "b"], [f"mb{i}"], name=f"bias{i}"))
        nodes.append(helper.make_node("Add", [h, f"mb{i}"], [f"h{i}"], name=f"res{i}"))
    return make_model(nodes, [("x", TensorProto.FLOAT, ["B", width])], [(f"h{layers}", TensorProto.FLOAT, ["B", width])], inits)


def test_w8a8_search_runs_fed_where_a_float_stream_crosses_every_cut():
    """No cut of the fused graph past the input carries integer codes only, so fused
    evaluations would each open and run nearly the whole graph: the evaluator runs fed,
    with a cut before each site."""
    from onnx_lapq.graph import normalize
    from onnx_lapq.evaluator import LossEvaluator

    model = float_stream_model()
    batches = [{"x": np.random.default_rng(s).standard_normal((16, 16)).astype(np.float32)} for s in range(2)]
    result = onnx_lapq.quantize(model, batches, config=onnx_lapq.QuantConfig(method="lapq", lapq=LapqOptions(max_evals=20)))
    assert result.report["evaluator"]["mode"] == "fed"
    assert result.report["evaluator"]["cuts"] >= 3
    fused = LossEvaluator(normalize(model), result.plan, batches, result.params, fused=True)
    assert max(c.position for c in fused.cuts) <= 1  # none past the input's QuantizeLinear: nearly the whole graph every time


@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (8, 4), (8, 8)], ids=["w4a4", "w4a8", "w8a4", "w8a8"])
def test_search_loss_is_the_exported_models_from_every_cut(block, bits):
    """Batches of different lengths; the evaluator's loss from every cut equals the exported
    model's bit for bit (ONNX Runtime fuses MatMuls with 8-bit inputs alike in both)."""
    from onnx_lapq.runtime import session
    from onnx_lapq.graph import normalize
    from onnx_lapq.evaluator import LossEvaluator

    batches = [padded_batch(8, 5, seed=0), padded_batch(8, 9, seed=1), padded_batch(5, 16, seed=2)]
    result = onnx_lapq.quantize(block, batches, config=onnx_lapq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], bias_correction=False))
    evaluator = LossEvaluator(normalize(block, min_opset=21), result.plan, batches, result.params, solution=result.solution, loss="mse")
    assert len(evaluator.cuts) > 2
    whole = evaluator.measure(session(result.model))
    assert evaluator(result.params) == whole
    for start in range(1, len(evaluator.cuts) + 1):
        for later in evaluator.cuts[start:]:
            later.versions = None  # stale: the evaluation starts at cut start - 1
        assert evaluator(result.params) == whole


def test_weight_only_int4_runs_as_matmulnbits(block, tmp_path):
    config = onnx_lapq.QuantConfig(weight_bits=4, weight_only=True, block_size=16)
    result = onnx_lapq.quantize(block, [padded_batch(4, 8)], config=config)
    assert not result.plan.activations and len(result.plan.weights) == 6
    dq = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 6 and all({a.name for a in n.attribute} == {"axis", "block_size"} for n in dq)
    codes = {t.name: t for t in result.model.graph.initializer if t.name.endswith("_quantized")}
    assert all(t.data_type == TensorProto.INT4 for t in codes.values())
    scale = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "up_W_scale"))
    assert scale.shape == (D // 16, HIDDEN)
    optimized = tmp_path / "opt.onnx"
    sess = ort_session(result.model, optimized_path=optimized)
    assert collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)["MatMulNBits"] == 6
    feeds = padded_batch(3, 7, seed=5)
    unfused = ort_session(result.model, optimize=False).run(None, feeds)[0]  # DequantizeLinear then float MatMul
    # MatMulNBits computes with int8-quantized activations by default (its accuracy level 4): close, not equal
    assert np.abs(sess.run(None, feeds)[0] - unfused).mean() < 0.05 * np.abs(unfused).mean()
    ref = ort_session(block).run(None, feeds)[0]
    assert np.abs(unfused - ref).mean() < 0.25 * np.abs(ref).mean()
    assert "sites (W4 weights only, blocks of 16, minmax)" in summary(result, 1.0, "out.onnx", None)


def test_weight_only_blocks_are_asymmetric_by_default(block):
    """Each block on the grid of its own [min, max] (zero points, as MatMulNBits takes them),
    which fits the weights closer than the symmetric grid; weight_symmetric=True keeps zero
    points at 0."""
    feeds = padded_batch(3, 7, seed=5)
    ref = ort_session(block).run(None, feeds)[0]
    errors = {}
    for symmetric in (None, True):
        config = onnx_lapq.QuantConfig(weight_bits=4, weight_only=True, block_size=16, weight_symmetric=symmetric)
        result = onnx_lapq.quantize(block, None, config=config)
        zero_points = [numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith("_zero_point")]
        assert len(zero_points) == 6 and all(np.any(z != 0) for z in zero_points) == (symmetric is None)
        errors[symmetric] = np.abs(ort_session(result.model, optimize=False).run(None, feeds)[0] - ref).mean()
    assert errors[None] < errors[True]


@pytest.mark.parametrize("weight_only", [False, True])
def test_embedding_tables_are_stored_as_integers(weight_only):
    vocab, dim = 50, 32
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    w = (rng.standard_normal((dim, 8)) / np.sqrt(dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"), helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")],
        "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ids = rng.integers(0, vocab, (4, 6)).astype(np.int64)
    config = onnx_lapq.QuantConfig(weight_bits=4, act_bits=8, weight_only=weight_only, op_types=("MatMul", "Gather"), block_size=16)
    result = onnx_lapq.quantize(model, [{"ids": ids}], config=config)
    site = next(s for s in result.plan.weights if s.op_type == "Gather")
    assert (site.axis, site.block_size) == ((1, 16) if weight_only else (0, None))
    codes = next(t for t in result.model.graph.initializer if t.name == "table_quantized")
    assert codes.data_type == TensorProto.INT4
    out = ort_session(result.model).run(None, {"ids": ids})[0]
    ref = ort_session(model).run(None, {"ids": ids})[0]
    assert np.abs(out - ref).mean() < 0.2 * np.abs(ref).mean()


def test_weight_only_blocks_match_numpy():
    from onnx_lapq import clip, qmath

    w = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    fmt = qmath.QFormat(4, signed=True, symmetric=True)
    lo, hi = clip.weight_range(w, 0, fmt, "minmax", 2.0, block_size=16)
    assert hi.shape == (3, 3)
    for b in range(3):
        np.testing.assert_allclose(hi[b], np.abs(w[16 * b:16 * (b + 1)]).max(axis=0))
    scale, zp = qmath.scale_zero_point(lo, hi, fmt)
    codes = qmath.quantize(w, scale, zp, fmt, axis=0, block_size=16)
    np.testing.assert_array_equal(codes[20], np.rint(w[20] / scale[1]).clip(-7, 7))


def test_auto_weights_reconstruct_a_transformer_with_gptq_and_a_cnn_with_adaround(block):
    from conftest import digits
    result = onnx_lapq.quantize(block, [padded_batch(16, 8)], config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=8, method="mse"))
    assert result.config.weights == "gptq" and [r.stage for r in result.stages][-2:] == ["gptq", "mse"]
    model, calibration = digits()
    result = onnx_lapq.quantize(model, calibration, config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=8, method="mse"))
    assert result.config.weights == "adaround" and [r.stage for r in result.stages][-2:] == ["adaround", "mse"]
    eight = onnx_lapq.quantize(block, [padded_batch(16, 8)])
    assert eight.config.weights == "auto" and eight.config.weight_rounding == "nearest"
