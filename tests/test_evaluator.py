"""The loss evaluator: its loss equals the exported model's (at any batch, whatever stale
shapes the model records), caching never changes a loss, its mode comes from the graph, its
sessions, threads and timings, and its release when the export fails or the search is
interrupted."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from conftest import block_model, conv_chain_model, digits, lapq_config, make_model, random_inputs

import onnx_lapq
from onnx_lapq.evaluator import LossEvaluator
from onnx_lapq.graph import normalize
from onnx_lapq.params import ParamSpace
from onnx_lapq.runtime import session


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (3, 3)])
@pytest.mark.slow
def test_cached_evaluation_equals_full_evaluation(bits):
    """The prefix cache never changes a loss: compare with a fresh evaluator (no cache) on the same params."""
    model = block_model(opset=21)
    calib = random_inputs(model, 48, batch=16)
    config = onnx_lapq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], bias_correction=False)
    result = onnx_lapq.quantize(model, calib, config=config)
    normalized = normalize(model, min_opset=21)
    cached = LossEvaluator(normalized, result.plan, calib, result.params, solution=result.solution, loss="mse", fused=bits == (8, 8))
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
        fresh = LossEvaluator(normalized, result.plan, calib, params, solution=result.solution, loss="mse", memory_budget=0, fused=bits == (8, 8))
        assert len(fresh.cuts) == 1
        assert cached(params) == pytest.approx(fresh(params), rel=1e-6, abs=1e-12)
    assert cached.mean_suffix_fraction < 1.0


@pytest.mark.parametrize("tick", [0.0, 1.0])
def test_w8a8_evaluator_is_fused_where_integer_only_cuts_exist_whatever_the_clock(tick, monkeypatch):
    """The mode comes from the graph: a clock under which every session open takes as long as
    an FP32 pass (tick 1) or no time at all (tick 0) changes nothing (it once decided it, so
    a loaded machine could change the exported model)."""
    import itertools

    import onnx_lapq.evaluator as evaluator_module

    model = block_model(opset=13)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    clock = itertools.count(0.0, tick) if tick else itertools.repeat(0.0)
    monkeypatch.setattr(evaluator_module.time, "perf_counter", lambda: next(clock))
    evaluator = LossEvaluator(normalize(model), result.plan, calib, result.params, solution=result.solution, loss="mse")
    assert evaluator.fused and len(evaluator.cuts) > 1


@pytest.mark.parametrize("bits, fused", [((4, 4), False), ((4, 8), False), ((8, 4), False), ((8, 8), True)])
def test_evaluator_loss_matches_exported_model(bits, fused):
    """Bit for bit: ONNX Runtime fuses the evaluator's graph as it fuses the exported one
    (4-bit weights arrive dequantized, so their Gemm stays float as the exported INT4 one
    does; 8-bit weights with 8-bit activations make a QGemm in both)."""
    model = block_model(opset=21)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], bias_correction=False))
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, solution=result.solution, loss="kl", fused=fused)
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
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, solution=result.solution, loss="kl")
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
    import onnx_lapq.evaluator as evaluator_module

    model = block_model(opset=21)
    calib = random_inputs(model, 64, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(weight_bits=4, act_bits=4, bias_correction=False))
    normalized = normalize(model, min_opset=21)
    concurrent = LossEvaluator(normalized, result.plan, calib, result.params, solution=result.solution, loss="kl")
    monkeypatch.setattr(evaluator_module, "cores", lambda: 2)
    two = LossEvaluator(normalized, result.plan, calib, result.params, solution=result.solution, loss="kl")
    assert (two._workers, two._threads) == (2, 1)
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in two._fed_sessions)
    monkeypatch.setattr(evaluator_module, "MAX_CONCURRENT_BATCHES", 1)
    one = LossEvaluator(normalized, result.plan, calib, result.params, solution=result.solution, loss="kl")
    assert (one._workers, one._threads) == (1, 2)
    losses = {e(result.params) for e in (concurrent, two, one)}
    assert len(losses) == 1 and losses == {concurrent.measure(session(result.model))}


@pytest.mark.parametrize("fused", [False, True])
def test_evaluator_sessions_share_one_memory_arena(fused, monkeypatch):
    """The sessions that evaluations run draw on the process's shared arena: an arena per fed
    suffix cost gigabytes, none made each run fetch fresh memory, and a fused session's own
    arena started empty at every evaluation."""
    import onnx_lapq.runtime as runtime_module  # where every session is made

    opened = []

    def spy(model, **kw):
        sess = session(model, **kw)
        opened.append(sess.get_session_options())
        return sess

    model = block_model(opset=21)
    calib = random_inputs(model, 32, batch=16)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    evaluator = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, solution=result.solution, loss="mse", fused=fused)
    monkeypatch.setattr(runtime_module, "session", spy)
    evaluator(result.params)
    suffixes = opened if fused else [s.get_session_options() for s in evaluator._fed_sessions]
    assert len(suffixes) == (1 if fused else len(evaluator.cuts))
    for options in suffixes:
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        assert not options.enable_cpu_mem_arena


def test_fp32_passes_are_timed_through_the_search():
    """The cost ratio's FP32 baseline is sampled before and during the search, not once."""
    from onnx_lapq.evaluator import FP32_EVERY, FP32_TIMINGS

    model = conv_chain_model()
    calib = random_inputs(model, 16, batch=8)
    result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
    evaluator = LossEvaluator(normalize(model), result.plan, calib, result.params, solution=result.solution, loss="mse")
    assert len(evaluator.fp32_passes) == FP32_TIMINGS
    for _ in range(2 * FP32_EVERY):
        evaluator(result.params)
    assert len(evaluator.fp32_passes) == FP32_TIMINGS + 2
    assert evaluator.fp32_seconds == float(np.median(evaluator.fp32_passes)) > 0
    assert evaluator.cost_ratio > 0


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
