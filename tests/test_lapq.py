"""LAPQ: the loss evaluator, Lp initialization, the budgeted joint search and its report."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS_CALIB, DIGITS_MODEL, block_model, conv_chain_model, init_array, make_model, ort_session, random_inputs, relu6_model, run_cli

import onnx_lapq
from onnx_lapq.calibrate import session
from onnx_lapq.graph import INT4_OPSET, normalize
from onnx_lapq.methods.lapq_search import parabola_minimum
from onnx_lapq.loss import LossEvaluator, distance
from onnx_lapq.params import ParamSpace, SiteRanges
from onnx_lapq.plan import build_plan
from onnx_lapq.search import _Tracked, minimize
from onnx_lapq import LapqOptions


def digits():
    return onnx.load(DIGITS_MODEL), [dict(np.load(DIGITS_CALIB))]


def lapq_config(**kw):
    """A W3A3 lapq config of 120 evaluations; keywords that name LapqOptions' fields go there."""
    searched = {f.name for f in dataclasses.fields(LapqOptions)}
    top = {k: v for k, v in kw.items() if k not in searched}
    options = {"max_evals": 120, **{k: v for k, v in kw.items() if k in searched}}
    return onnx_lapq.QuantConfig(**{"weight_bits": 3, "act_bits": 3, "method": "lapq", **top}, lapq=LapqOptions(**options))


@pytest.fixture(scope="module")
def digits_lapq():
    model, calib = digits()
    return onnx_lapq.quantize(model, calib, config=lapq_config())


@pytest.mark.slow
def test_search_lowers_loss_below_lp_init(digits_lapq):
    report = digits_lapq.report
    assert report["final_loss"] < 0.8 * report["init_loss"]
    assert report["init_loss"] == min([*report["p_losses"].values(), *report["start_losses"].values()])  # the best start


@pytest.mark.slow
def test_exported_loss_matches_search(digits_lapq):
    report = digits_lapq.report
    assert abs(report["exported_loss"] - report["final_loss"]) <= 0.01 * report["final_loss"]


@pytest.mark.slow
def test_report_fields(digits_lapq):
    report = digits_lapq.report
    for key in ("final_loss", "exported_loss", "init_loss", "p_star", "nfev", "seconds", "loss_trace", "activations", "weights"):
        assert key in report, key
    grid = onnx_lapq.LapqOptions().lp_grid
    assert report["p_star"] is None or min(grid) <= report["p_star"] <= max(grid)
    assert set(report["start_losses"]) == {"minmax", "entropy"}
    trace_losses = [v for _, v in report["loss_trace"]]
    assert trace_losses == sorted(trace_losses, reverse=True) and trace_losses[-1] == report["final_loss"]
    assert any(a["scale"] != a["initial_scale"] for a in report["activations"])
    for w in report["weights"]:  # one searched factor per layer on its per-channel scales
        assert w["scale_min"] == pytest.approx(w["initial_scale_min"] * w["scale_factor"], rel=1e-5)
        assert w["scale_max"] == pytest.approx(w["initial_scale_max"] * w["scale_factor"], rel=1e-5)
    json.dumps(report)  # JSON-ready


@pytest.mark.slow
def test_max_evals_stops_search():
    model, calib = digits()
    result = onnx_lapq.quantize(model, calib, config=lapq_config(max_evals=15))
    assert result.report["nfev"] == 15
    assert "budget" in result.report["search_message"]
    assert result.report["final_loss"] <= result.report["init_loss"]


def test_time_limit_stops_search():
    model, calib = digits()
    started = time.perf_counter()
    result = onnx_lapq.quantize(model, calib, config=lapq_config(max_evals=100000, time_limit=1.0))
    assert "budget" in result.report["search_message"]
    assert result.report["search_seconds"] < 5.0
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("search", ["powell", "coordinate"])
@pytest.mark.slow
def test_lapq_is_deterministic(search):
    model, calib = digits()
    a = onnx_lapq.quantize(model, calib, config=lapq_config(search=search, max_evals=60))
    b = onnx_lapq.quantize(model, calib, config=lapq_config(search=search, max_evals=60))
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.report["final_loss"] == b.report["final_loss"]


@pytest.mark.slow
def test_coordinate_search_lowers_loss():
    model, calib = digits()
    result = onnx_lapq.quantize(model, calib, config=lapq_config(search="coordinate", max_evals=150))
    assert result.report["final_loss"] < result.report["init_loss"]


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (3, 3)])
@pytest.mark.slow
def test_cached_evaluation_equals_full_evaluation(bits):
    """The prefix cache never changes a loss: compare with a fresh evaluator (no cache) on the same params."""
    model = block_model(opset=21)
    calib = random_inputs(model, 48, batch=16)
    config = onnx_lapq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], bias_correction=False)
    result = onnx_lapq.quantize(model, calib, config=config)
    normalized = normalize(model, min_opset=21)
    cached = LossEvaluator(normalized, result.plan, calib, result.params, loss="mse", fused=bits == (8, 8))
    assert len(cached.cuts) > 1
    if cached.fused:  # only integer codes cross a cut: dequantized values would stop ORT's fusion after it
        producer = {o: n.op_type for n in cached.template.graph.node for o in n.output}
        assert {producer.get(t, "input") for c in cached.cuts for t in c.live} <= {"QuantizeLinear", "input"}
    rng = np.random.default_rng(0)
    space = ParamSpace(result.plan, result.solution.ranges)
    for step in range(40):
        x = np.zeros(space.size)
        x[rng.integers(space.size)] = rng.uniform(-1.0, 0.3)
        params = onnx_lapq.params.qparams(result.plan, space.ranges(x), weight_symmetric=True, act_symmetric=False)
        fresh = LossEvaluator(normalized, result.plan, calib, params, loss="mse", memory_budget=0, fused=bits == (8, 8))
        assert len(fresh.cuts) == 1
        assert cached(params) == pytest.approx(fresh(params), rel=1e-6, abs=1e-12)
    assert cached.mean_suffix_fraction < 1.0


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


@pytest.mark.parametrize("bits, order", [
    (dict(weight_bits=4, act_bits=8), ["weight:conv1_W", "weight:conv2_W", "weight:conva_W", "weight:convb_W", "weight:conv3_W",
                                       "weight:conv4_W", "weight:fc_W", "act:x", "act:relu1", "act:relu2", "act:cat", "act:pool", "act:flat"]),
    (dict(weight_bits=4, act_bits=4, keep_first_last_8bit=True), ["act:relu1", "weight:conv2_W", "act:relu2", "weight:conva_W", "weight:convb_W",
                                                                  "act:cat", "weight:conv3_W", "act:pool", "weight:conv4_W",
                                                                  "act:x", "act:flat", "weight:conv1_W", "weight:fc_W"]),
    (dict(weight_bits=8, act_bits=8), ["act:x", "act:relu1", "act:conv2", "act:relu2", "act:cat", "act:relu3", "act:relu4", "weight:conv1_W",
                                       "weight:conv2_W", "weight:conva_W", "weight:convb_W", "weight:conv3_W", "weight:conv4_W", "weight:fc_W"]),
])
def test_search_coordinates_run_coarse_grids_first_then_front_to_back(bits, order):
    """Each coordinate scales its own site's initial range, and no other."""
    plan = build_plan(normalize(block_model(opset=21), min_opset=21), onnx_lapq.QuantConfig(**bits))
    initial = SiteRanges({g: (-1.0, 2.0) for g in plan.groups}, {w.tensor: (-np.arange(1.0, 3.0), np.arange(1.0, 3.0)) for w in plan.weights})
    space = ParamSpace(plan, initial)
    assert space.names == order
    for k, name in enumerate(space.names):
        x = np.zeros(space.size)
        x[k] = np.log(2.0)
        ranges = space.ranges(x)
        assert set(ranges.activations) == set(plan.groups) and set(ranges.weights) == {w.tensor for w in plan.weights}
        for g, (lo, hi) in ranges.activations.items():
            factor = 2.0 if name == f"act:{g}" else 1.0
            assert (lo, hi) == pytest.approx((-1.0 * factor, 2.0 * factor))
        for w, (lo, hi) in ranges.weights.items():
            factor = 2.0 if name == f"weight:{w}" else 1.0
            np.testing.assert_allclose(hi, np.arange(1.0, 3.0) * factor)
            np.testing.assert_allclose(lo, -hi)


def _optimized_transposes(model: onnx.ModelProto, path) -> int:
    """Transposes in ONNX Runtime's optimized graph of ``model`` (NHWC layout of the integer kernels)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "Transpose" for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("tick", [0.0, 1.0])
def test_w8a8_evaluator_is_fused_where_integer_only_cuts_exist_whatever_the_clock(tick, monkeypatch):
    """The mode comes from the graph: a clock under which every session open takes as long as
    an FP32 pass (tick 1) or no time at all (tick 0) changes nothing (it once decided it, so
    a loaded machine could change the exported model)."""
    import itertools

    import onnx_lapq.loss as loss_module

    model = block_model(opset=13)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    clock = itertools.count(0.0, tick) if tick else itertools.repeat(0.0)
    monkeypatch.setattr(loss_module.time, "perf_counter", lambda: next(clock))
    evaluator = LossEvaluator(normalize(model), result.plan, calib, result.params, loss="mse")
    assert evaluator.fused and len(evaluator.cuts) > 1


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
        suffix = evaluator._suffix(cut, evaluator.cuts[i + 1:i + 2])
        assert _optimized_transposes(suffix, tmp_path / f"suffix{i}.onnx") <= whole


@pytest.mark.parametrize("bits, fused", [((4, 4), False), ((4, 8), False), ((8, 4), False), ((8, 8), True)])
def test_evaluator_loss_matches_exported_model(bits, fused):
    """Bit for bit: ONNX Runtime fuses the evaluator's graph as it fuses the exported one
    (4-bit weights arrive dequantized, so their Gemm stays float as the exported INT4 one
    does; 8-bit weights with 8-bit activations make a QGemm in both)."""
    model = block_model(opset=21)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], bias_correction=False))
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="kl", fused=fused)
    exported = evaluator.measure(session(result.model))
    assert evaluator(result.params) == exported


def _zero_point_types(model: onnx.ModelProto) -> dict[str, int]:
    """Activation tensor -> ONNX type of its QuantizeLinear's zero point (initializer or graph input)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    return {n.name[:-len("_QuantizeLinear")]: types[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_fed_evaluator_carries_4bit_convolution_inputs_in_bytes():
    """Sub-8-bit activations that only convolutions read run as Clip and uint8 in the evaluator
    (ONNX Runtime's 4-bit QuantizeLinear and DequantizeLinear are several times slower); one
    that an Add also reads stays UINT4, and so does every activation of the exported model.
    The loss is the exported model's bit for bit, with batches evaluated two at a time."""
    model = block_model(opset=21)
    calib = random_inputs(model, 48, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=4, bias_correction=False))
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="kl")
    assert not evaluator.fused and len(evaluator.batches) == 3
    fed = _zero_point_types(evaluator.template)
    exported = _zero_point_types(result.model)
    assert fed["x"] == fed["relu2"] == onnx.TensorProto.UINT8  # read by convolutions only
    assert {"x_Clip", "relu2_Clip"} <= {n.name for n in evaluator.template.graph.node}
    assert fed["relu1"] == onnx.TensorProto.UINT4  # conv2 and the residual Add read it
    assert exported["x"] == exported["relu2"] == exported["relu1"] == onnx.TensorProto.UINT4
    assert evaluator(result.params) == evaluator.measure(session(result.model))


def test_evaluations_run_batches_concurrently_with_the_sequential_result(monkeypatch):
    """Batches run two at a time, each session on half the cores (ONNX Runtime's
    DequantizeLinear uses one thread whatever the session's setting); the loss is the sum
    over batches in their order, the same as one batch after another on all cores."""
    import onnx_lapq.loss as loss_module

    model = block_model(opset=21)
    calib = random_inputs(model, 64, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=4, bias_correction=False))
    normalized = normalize(model, min_opset=21)
    concurrent = LossEvaluator(normalized, result.plan, calib, result.params, loss="kl")
    monkeypatch.setattr(loss_module, "_cores", lambda: 2)
    two = LossEvaluator(normalized, result.plan, calib, result.params, loss="kl")
    assert (two._workers, two._threads) == (2, 1)
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in two._fed_sessions)
    monkeypatch.setattr(loss_module, "MAX_CONCURRENT_BATCHES", 1)
    one = LossEvaluator(normalized, result.plan, calib, result.params, loss="kl")
    assert (one._workers, one._threads) == (1, 2)
    losses = {e(result.params) for e in (concurrent, two, one)}
    assert len(losses) == 1 and losses == {concurrent.measure(session(result.model))}


@pytest.mark.parametrize("bits", [(4, 4), (8, 8)])
@pytest.mark.slow
def test_stale_value_info_of_the_model_does_not_fix_the_batch(bits):
    """A model whose value_info still records batch 1 (an export at a fixed batch made
    dynamic later) runs at any batch; so do the evaluator's sessions."""
    model = block_model(opset=21)
    for name, shape in [("relu1", [1, 4, 8, 8]), ("relu2", [1, 4, 8, 8]), ("cat", [1, 6, 8, 8]), ("pool", [1, 4, 4, 4]), ("flat", [1, 64])]:
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    calib = random_inputs(model, 48, batch=16)
    result = onnx_lapq.quantize(model, calib, config=lapq_config(weight_bits=bits[0], act_bits=bits[1], max_evals=20))
    assert result.report["nfev"] == 20
    assert result.report["exported_loss"] == pytest.approx(result.report["final_loss"], rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_evaluator_sessions_share_one_memory_arena(fused, monkeypatch):
    """The sessions that evaluations run draw on the process's shared arena: an arena per fed
    suffix cost gigabytes, none made each run fetch fresh memory, and a fused session's own
    arena started empty at every evaluation."""
    import onnx_lapq.calibrate as calibrate_module  # where every session is made

    opened = []

    def spy(model, **kw):
        sess = session(model, **kw)
        opened.append(sess.get_session_options())
        return sess

    model = block_model(opset=21)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="mse", fused=fused)
    monkeypatch.setattr(calibrate_module, "session", spy)
    evaluator(result.params)
    suffixes = opened if fused else [s.get_session_options() for s in evaluator._fed_sessions]
    assert len(suffixes) == (1 if fused else len(evaluator.cuts))
    for options in suffixes:
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        assert not options.enable_cpu_mem_arena


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_release_shared_arena_returns_its_free_memory():
    """Intermediates of a shared-arena session stay resident after the run (the arena keeps
    them for the next session) until release_shared_arena gives them back."""
    from onnx_lapq.calibrate import release_shared_arena

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


def test_session_arena_choices():
    model = conv_chain_model()
    assert session(model).get_session_options().enable_cpu_mem_arena
    assert not session(model, arena="none").get_session_options().enable_cpu_mem_arena
    with pytest.raises(ValueError, match="arena"):
        session(model, arena="private")


def test_fp32_passes_are_timed_through_the_search():
    """The cost ratio's FP32 baseline is sampled before and during the search, not once."""
    from onnx_lapq.loss import FP32_EVERY, FP32_TIMINGS

    model = conv_chain_model()
    calib = random_inputs(model, 16, batch=8)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    evaluator = LossEvaluator(normalize(model), result.plan, calib, result.params, loss="mse")
    assert len(evaluator.fp32_passes) == FP32_TIMINGS
    for _ in range(2 * FP32_EVERY):
        evaluator(result.params)
    assert len(evaluator.fp32_passes) == FP32_TIMINGS + 2
    assert evaluator.fp32_seconds == float(np.median(evaluator.fp32_passes)) > 0
    assert evaluator.cost_ratio > 0


def test_distances_against_numpy():
    rng = np.random.default_rng(0)
    ref, out = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(1, keepdims=True)
    np.testing.assert_allclose(distance("kl", ref, out, None, False), (p * np.log(p / q)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(distance("kl", p, q, None, True), (p * np.log(p / q)).sum(1), rtol=1e-10)
    labels = np.array([0, 1, 2, 3, 4])
    np.testing.assert_allclose(distance("ce", ref, out, labels, False), -np.log(q[np.arange(5), labels]), rtol=1e-10)
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(distance("cosine", ref, out, None, False), 1 - cos, rtol=1e-10)
    np.testing.assert_allclose(distance("mse", ref, out, None, False), ((out - ref) ** 2).sum(1) / (ref**2).sum(1), rtol=1e-10)


def test_lp_start_never_worse_than_best_grid_point():
    """A parabola clamped onto a grid end must not beat a better grid point (the loss zig-zags over p)."""
    from onnx_lapq.methods.lapq_search import run_lapq
    from onnx_lapq.params import SiteRanges

    table = {2.0: 5.2, 2.5: 1.2, 3.0: 6.2, 3.5: 7.8, 4.0: 6.1}
    ranges = {p: SiteRanges(activations={"p": (0.0, p)}) for p in table}
    calibrated = {"minmax": SiteRanges(activations={"p": (0.0, 99.0)})}

    class Space:
        size, bounds = 0, []

        def ranges(self, x):
            return ranges[2.5]

    outcome = run_lapq(
        lambda p: ranges[p], calibrated, lambda r: table.get(r.activations["p"][1], 50.0), lambda r: Space(),
        lp_grid=tuple(table), search="coordinate", max_evals=5, time_limit=None, iterations=1, step=0.01,
    )
    assert outcome.p_star == 2.5 and outcome.init_loss == 1.2


def test_time_limit_covers_the_start_candidates():
    """The start's evaluations (five p values, one calibrator) take at least 0.3 s here; with a
    0.2 s time limit the search gets nothing left and the start is the result."""
    from onnx_lapq.methods.lapq_search import run_lapq
    from onnx_lapq.params import ParamSpace, SiteRanges
    from onnx_lapq.plan import ActivationSite, QuantPlan

    plan = QuantPlan(weights=(), activations=(ActivationSite("a", 8, "input", "a"),), biases=())

    def slow_loss(ranges):
        time.sleep(0.05)
        return abs(ranges.activations["a"][1] - 3.3)

    outcome = run_lapq(
        lambda p: SiteRanges(activations={"a": (0.0, p)}), {"minmax": SiteRanges(activations={"a": (0.0, 9.0)})}, slow_loss,
        lambda r: ParamSpace(plan, r), lp_grid=(2.0, 2.5, 3.0, 3.5, 4.0), search="coordinate", max_evals=50, time_limit=0.2,
        iterations=1, step=0.01,
    )
    assert outcome.search.nfev == 0 and outcome.search.fun == outcome.init_loss


def test_parabola_minimum():
    ps = [2.0, 2.5, 3.0, 3.5, 4.0]
    assert parabola_minimum(ps, [(p - 2.8) ** 2 + 1 for p in ps]) == pytest.approx(2.8)
    assert parabola_minimum(ps, [(p - 9.0) ** 2 for p in ps]) == 4.0  # clamped to the grid
    assert parabola_minimum(ps, [-((p - 3.0) ** 2) for p in ps]) is None  # concave: no minimum
    assert parabola_minimum([2.0, 3.0], [1.0, 0.5]) is None


def test_minimize_keeps_best_point_and_respects_bounds():
    target = np.array([0.3, -1.2, 0.1])
    values = []

    def fun(x):
        values.append(float(np.sum((x - target) ** 2)))
        return values[-1]

    bounds = [(-3.0, 0.2)] * 3
    res = minimize(fun, np.zeros(3), bounds, method="powell", max_evals=400)
    assert res.fun == min(values) and res.nfev == len(values)
    assert np.all(res.x <= 0.2 + 1e-9) and res.x[1] == pytest.approx(-1.2, abs=0.05)
    res = minimize(fun, np.zeros(3), bounds, method="coordinate", max_evals=400, iterations=3)
    assert res.x[1] == pytest.approx(-1.2, abs=0.05) and res.nfev <= 400


@pytest.mark.parametrize("method", ["powell", "coordinate"])
def test_search_measures_each_lattice_point_once(method):
    """A loss that is rough below the step (as 4-bit rounding makes it) costs one evaluation
    per lattice point: no repeats, nothing off the lattice or out of bounds."""
    step, bounds = 0.01, [(-3.0, 0.5)] * 4
    target = np.array([0.3, -1.2, 0.1, -0.4])
    seen, values = [], []

    def fun(x):
        seen.append(np.array(x))
        values.append(float(np.sum((x - target) ** 2) + 1e-3 * np.sin(1e4 * np.sum(x))))
        return values[-1]

    res = minimize(fun, np.zeros(4), bounds, method=method, max_evals=300, iterations=6, step=step)
    points = np.array(seen)
    assert len({p.tobytes() for p in points}) == len(points) == res.nfev
    assert np.allclose(points / step, np.round(points / step), atol=1e-6) and np.all(points >= -3.0) and np.all(points <= 0.5)
    assert res.fun == min(values) and np.allclose(res.x, target, atol=0.05)


def test_a_lattice_point_is_measured_once_whatever_its_sign_and_rounding():
    tracked = _Tracked(lambda x: float(x[0]), [(-3.0, 1.0)], 0.01, 10, None, None)
    for x in ([-0.0], [0.0], [-0.004], [0.0049]):
        assert tracked(np.array(x)) == 0.0
    assert tracked.nfev == 1 and tracked(np.array([-0.006])) == -0.01 and tracked.nfev == 2


@pytest.mark.parametrize("method", ["powell", "coordinate"])
def test_a_budget_stop_reports_the_iterations_completed(method):
    target = np.array([0.3, -1.2, 0.1])

    def fun(x):
        return float(np.sum((x - target) ** 2 * np.array([1.0, 3.0, 9.0])) + 0.5 * x[0] * x[1])

    full = minimize(fun, np.zeros(3), [(-3.0, 1.0)] * 3, method=method, max_evals=1000, iterations=10, step=0.01)
    cut = minimize(fun, np.zeros(3), [(-3.0, 1.0)] * 3, method=method, max_evals=full.nfev - 1, iterations=10, step=0.01)
    assert full.success and full.nit >= 2
    assert not cut.success and cut.nit == full.nit - 1 and "budget" in cut.message


@pytest.mark.parametrize("method", ["powell", "coordinate"])
def test_a_continued_search_takes_up_the_coordinate_it_stopped_on(method):
    """A budget stops the first sweep on some coordinate; the search continued from its best
    point (lapq.resume, after the bias-correction race) moves that coordinate first and
    reaches the ones after it before the ones already searched."""
    target = np.linspace(-0.6, 0.5, 8)

    def fun(x):
        return float(np.sum((x - target) ** 2))

    first = minimize(fun, np.zeros(8), [(-3.0, 1.0)] * 8, method=method, max_evals=12, iterations=3, step=0.01)
    assert not first.success and 0 < first.next_axis < 7

    moved = []

    def watched(x):
        changed = np.flatnonzero(x != first.x)
        if len(changed) == 1 and (not moved or moved[-1] != changed[0]):
            moved.append(int(changed[0]))
        return fun(x)

    more = minimize(watched, first.x, [(-3.0, 1.0)] * 8, method=method, max_evals=25, iterations=3, step=0.01, first_axis=first.next_axis)
    assert moved[0] == first.next_axis
    assert more.fun < first.fun
    done = minimize(fun, np.zeros(8), [(-3.0, 1.0)] * 8, method=method, max_evals=10_000, iterations=3, step=0.01)
    assert done.success and done.next_axis == 0


@pytest.mark.slow
def test_resume_continues_from_the_coordinate_the_race_winner_stopped_on(monkeypatch):
    """After the bias-correction race the winner's search goes on from the coordinate it
    had reached, not from the first one again."""
    import onnx_lapq.methods.lapq_search as lapq_module

    calls = []

    def spy(*args, **kw):
        result = minimize(*args, **kw)
        calls.append((kw.get("first_axis", 0), result))
        return result

    monkeypatch.setattr(lapq_module, "minimize", spy)
    report = onnx_lapq.quantize(*digits(), config=lapq_config(max_evals=40)).report
    race = report["bias_correction_race"]
    assert race["evaluations"] == 20 and len(calls) == 3  # with correction, without, then the winner resumed
    winner = calls[0][1] if race["kept"] else calls[1][1]
    assert calls[0][0] == calls[1][0] == 0
    assert calls[2][0] == winner.next_axis > 0


@pytest.mark.slow
def test_a_failed_export_still_closes_the_evaluator(monkeypatch):
    """The search's evaluator stops its threads and gives its memory back even when the
    export after the search fails."""
    import onnx_lapq.pipeline as pipeline_module

    closed = []
    monkeypatch.setattr(LossEvaluator, "close", lambda self: closed.append(self._pool.shutdown()))

    def broken(*args, **kw):
        raise onnx_lapq.ExportError("export failed")

    monkeypatch.setattr(pipeline_module, "check_exported", broken)
    with pytest.raises(onnx_lapq.ExportError, match="export failed"):
        onnx_lapq.quantize(*digits(), config=lapq_config(max_evals=5))
    assert len(closed) == 1


def test_an_interrupted_search_releases_the_evaluator(monkeypatch):
    """Ctrl-C in the middle of the search (here raised by the progress callback) still stops
    the evaluator's threads and drops its sessions and cached activations, although the
    traceback keeps the evaluator itself alive."""
    closed = []
    close = LossEvaluator.close
    monkeypatch.setattr(LossEvaluator, "close", lambda self: (close(self), closed.append(self)))

    def interrupt(progress):
        if progress.stage == "search" and progress.done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        onnx_lapq.quantize(*digits(), config=lapq_config(max_evals=100), on_step=interrupt)
    (evaluator,) = closed
    assert not any(t.is_alive() for t in evaluator._pool._threads)
    assert evaluator._fed_sessions == [] and evaluator._fp32 is None
    assert all(cut.values is None for cut in evaluator.cuts)


@pytest.mark.slow
def test_cross_entropy_with_labels(tmp_path):
    model, (calib,) = digits()
    labels = session(model).run(None, calib)[0].argmax(axis=1)  # the float model's own answers
    config = lapq_config(loss="ce", label_key="label", max_evals=40)
    result = onnx_lapq.quantize(model, [{**calib, "label": labels}], config=config)
    assert result.report["loss"] == "ce" and result.report["final_loss"] <= result.report["init_loss"]
    with pytest.raises(onnx_lapq.ConfigError):
        onnx_lapq.QuantConfig(method="lapq", lapq=LapqOptions(loss="ce"))


@pytest.mark.slow
def test_search_bias_correction_forced_on_and_off():
    """"on" and "off" decide whether the searched model's biases are corrected, whatever auto would."""
    model, calib = digits()
    results = {keep: onnx_lapq.quantize(model, calib, config=lapq_config(max_evals=20, search_bias_correction=keep)) for keep in ("on", "off")}
    assert results["on"].report["bias_correction"] is True and results["off"].report["bias_correction"] is False
    biases = {keep: [init_array(r.model, b.tensor + "_quantized") for b in r.plan.biases] for keep, r in results.items()}
    assert any(not np.array_equal(a, b) for a, b in zip(biases["on"], biases["off"]))
    plain = onnx_lapq.quantize(model, calib, config=lapq_config(max_evals=20, search_bias_correction="on", bias_correction=False))
    assert plain.report["bias_correction"] is False  # nothing to keep when bias correction is off altogether
    with pytest.raises(onnx_lapq.ConfigError, match="search_bias_correction"):
        lapq_config(search_bias_correction="yes")
    for step in (-0.01, 1.0):
        with pytest.raises(onnx_lapq.ConfigError, match="search_step"):
            lapq_config(search_step=step)


@pytest.mark.slow
def test_search_bias_correction_race_keeps_the_side_with_the_lower_loss():
    """Each side searches a quarter of the budget, the lower one goes on with the rest, and
    the export carries that side's biases (its loss is the search's)."""
    model, calib = digits()
    report = onnx_lapq.quantize(model, calib, config=lapq_config(max_evals=60, search_bias_correction="race")).report
    race = report["bias_correction_race"]
    assert race["kept"] == (race["on"] < race["off"]) == report["bias_correction"]
    assert race["evaluations"] <= 30 < report["nfev"] <= 60
    assert report["final_loss"] <= min(race["on"], race["off"])
    assert report["exported_loss"] == pytest.approx(report["final_loss"], rel=1e-5)
    counts = []
    onnx_lapq.quantize(model, calib, config=lapq_config(max_evals=60, search_bias_correction="race"),
                       on_step=lambda p: counts.append(p.done) if p.stage == "search" else None)
    assert max(counts) == counts[-1] == report["nfev"]  # the progress counts the race's evaluations once


def _grid_mlp() -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm whose weights sit on their own min/max 8-bit grid (each row's
    largest magnitude 127 steps of 1/64), so min/max weight quantization changes nothing."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def on_grid(rows: int, cols: int) -> np.ndarray:
        steps = rng.integers(-126, 127, (rows, cols))
        steps[:, 0] = 127
        return (steps / 64.0).astype(np.float32)

    inits = [numpy_helper.from_array(on_grid(8, 16), "w1"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(on_grid(4, 8), "w2"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "grid_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.slow
def test_no_race_where_bias_correction_changes_nothing():
    """When correction leaves the min/max start's loss exactly as it is, both sides of a race
    would search alike: the search runs once, with the whole budget, uncorrected."""
    model = _grid_mlp()
    report = onnx_lapq.quantize(model, random_inputs(model, 64), config=lapq_config(weight_bits=8, act_bits=8, max_evals=40)).report
    assert "bias_correction_race" not in report and report["bias_correction"] is False
    assert report["nfev"] == 40
    raced = onnx_lapq.quantize(*digits(), config=lapq_config(max_evals=40)).report  # where correction matters, the default races
    assert raced["bias_correction_race"]["evaluations"] == 20


@pytest.mark.slow
def test_cli_lapq_writes_report(tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    proc = run_cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--method", "lapq", "--weight-bits", "3", "--act-bits", "3",
                   "--max-evals", "40", "--search", "coordinate", "--search-bias-correction", "on", "--search-step", "0.05", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["nfev"] == 40 and "searched" in proc.stdout and data["bias_correction"] is True
    steps = [np.log(a["scale"] / a["initial_scale"]) / 0.05 for a in data["activations"]]  # the searched clips lie on the lattice
    assert data["config"]["lapq"]["search_step"] == 0.05 and np.allclose(steps, np.round(steps), atol=1e-3) and np.any(np.round(steps) != 0)
    onnx.checker.check_model(onnx.load(out))


def test_progress_bar_shows_count_eta_and_loss():
    import io

    from onnx_lapq.progress import Progress
    from onnx_lapq.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream)
    for n in range(1, 11):
        bar(Progress("search", n, 10, 1.0 / n))
    bar.close()
    line = stream.getvalue().strip()
    assert line.startswith("search") and "10/10" in line and "ETA" in line and "loss 0.1" in line


def test_auto_loss_leaves_kl_when_the_softmax_is_saturated():
    """Logits in the thousands (mnist-8 on raw pixels) make every KL ~1e-49: auto takes mse there."""
    from onnx import numpy_helper

    calib = None
    kinds = {}
    for scale in (1.0, 1e4):
        model = block_model(opset=21)
        for t in model.graph.initializer:
            if t.name in ("fc_W", "fc_B"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), t.name))
        calib = calib or random_inputs(model, 32, batch=16)
        result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
        kinds[scale] = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="auto").kind
        assert LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="kl").kind == "kl"  # asked for
    assert kinds == {1.0: "kl", 1e4: "mse"}


@pytest.mark.parametrize("bits", [8, 4])
def test_search_never_lifts_an_8bit_clip_past_its_relu6(bits):
    """At 8 bits, coordinates of groups a Clip(0, 6) makes end where the clip reaches 6 (an
    initial clip above it is left free) and any x gives at most 6; below 8 bits, nothing is capped."""
    plan = build_plan(normalize(relu6_model(), min_opset=INT4_OPSET), onnx_lapq.QuantConfig(weight_bits=bits, act_bits=bits))
    assert plan.groups[:3] == ("x", "clip1", "clip2")
    space = ParamSpace(plan, SiteRanges(activations=dict(zip(plan.groups, [(-4.0, 4.0), (0.0, 5.0), (0.0, 6.5), (0.0, 9.0)]))))
    bounds = dict(zip(space.names, space.bounds))
    assert bounds["act:clip1"][1] == pytest.approx(np.log(6.0 / 5.0) if bits == 8 else np.log(2.0))
    assert bounds["act:clip2"][1] == bounds["act:x"][1] == pytest.approx(np.log(2.0))
    lifted = space.ranges(np.full(space.size, 1.0)).activations
    assert (lifted["clip1"][1] == 6.0) == (bits == 8) and lifted["clip2"][1] > 6.5


def test_w8a8_lapq_keeps_relu6_layers_fused(tmp_path):
    """A Relu6 whose clip the search lifted past 6 stayed in the graph, and ONNX Runtime ran
    its layer in float (mobilenet_v1_0.25 W8A8: 3 of 28 convolutions; this model: 2 of 3)."""
    model = relu6_model()
    result = onnx_lapq.quantize(model, random_inputs(model, 64, batch=16), config=lapq_config(weight_bits=8, act_bits=8))
    assert max(a["range"][1] for a in result.report["activations"] if a["group"] in ("clip1", "clip2")) <= 6.0
    optimized = tmp_path / "optimized.onnx"
    ort_session(result.model, optimize=True, optimized_path=optimized)
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 3 and "Clip" not in ops and "FusedConv" not in ops


def test_corrected_bias_follows_its_weight_when_its_own_scale_stays():
    """A bias whose weight scale grew to hold it (params._widened_for_biases) keeps s_b = s_in * s_w
    fixed while the search moves s_in and s_w; its correction still changes with s_w's grid, so
    an evaluator that moved there from another point gives a fresh evaluator's loss."""
    rng = np.random.default_rng(0)
    nodes = [onnx.helper.make_node("Gemm", ["x", "W", "B"], ["h"], name="g1", transB=1),
             onnx.helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="g2", transB=1)]
    model = normalize(make_model(nodes, [("x", onnx.TensorProto.FLOAT, [None, 16])], [("y", onnx.TensorProto.FLOAT, [None, 4])], {
        "W": (rng.standard_normal((8, 16)) * 1e-3).astype(np.float32), "B": np.full(8, 50.0, np.float32),
        "W2": (rng.standard_normal((4, 8)) * 0.1).astype(np.float32), "B2": np.zeros(4, np.float32)}), min_opset=21)
    config = onnx_lapq.QuantConfig(weight_bits=16, act_bits=16, per_channel=False)
    batch = {"x": (rng.standard_normal((64, 16)) + 3).astype(np.float32)}
    result = onnx_lapq.quantize(model, [batch], config=config)  # minmax ranges, biases corrected
    plan, start, solution = result.plan, result.solution.ranges, result.solution
    assert solution.input_means

    def params(ranges):
        return onnx_lapq.params.qparams(plan, ranges, weight_symmetric=True, act_symmetric=False)

    before = params(start)
    after = params(dataclasses.replace(start, activations={**start.activations, "x": tuple(0.6 * v for v in start.activations["x"])}))
    assert after["B"].scale.tobytes() == before["B"].scale.tobytes() and after["W"].scale != before["W"].scale
    moved = LossEvaluator(model, plan, [batch], before, loss="mse", solution=solution)
    moved(before)
    fresh = LossEvaluator(model, plan, [batch], after, loss="mse", solution=solution)
    assert moved(after) == fresh(after)


@pytest.mark.parametrize("max_evals", [1, 2, 9, 40])
@pytest.mark.slow
def test_search_counts_agree_with_the_progress_events(max_evals):
    """nfev, the loss trace and the progress events count the same evaluations, race or not:
    nfev never passes max_evals, the trace is numbered as the evaluations ran, and the loss
    shown only falls, ending at final_loss."""
    model, calib = onnx.load(DIGITS_MODEL), [{"input": np.load(DIGITS_CALIB)["input"][:64]}]
    events = []
    config = onnx_lapq.QuantConfig(weight_bits=4, act_bits=4, method="lapq", lapq=LapqOptions(max_evals=max_evals))
    report = onnx_lapq.quantize(model, calib, config=config, on_step=events.append).report
    search = [e for e in events if e.stage == "search"]
    assert report["nfev"] == len(search) == search[-1].done <= max_evals
    assert [e.done for e in search] == list(range(1, len(search) + 1))
    losses = [e.loss for e in search]
    assert losses == sorted(losses, reverse=True) and losses[-1] == report["final_loss"]
    for n, value in report["loss_trace"]:
        assert value == min(e.loss for e in search if e.done <= n)
