"""The lapq stage: its start (the Lp sweep over p, the parabola, the calibrators' candidates),
the budgeted search it runs through quantize, the bias-correction race, the loss it tunes,
its report fields and the progress events its evaluations send."""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from conftest import DIGITS_CALIB, DIGITS_MODEL, digits, init_array, lapq_config, ort_session, random_inputs, relu6_model

import onnx_lapq
from onnx_lapq import LapqOptions
from onnx_lapq.methods.lapq_search import parabola_minimum, run_lapq
from onnx_lapq.params import ParamSpace, SiteRanges
from onnx_lapq.plan import ActivationSite, QuantPlan
from onnx_lapq.runtime import session
from onnx_lapq.search import minimize


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


@pytest.mark.slow
def test_coordinate_search_lowers_loss():
    model, calib = digits()
    result = onnx_lapq.quantize(model, calib, config=lapq_config(search="coordinate", max_evals=150))
    assert result.report["final_loss"] < result.report["init_loss"]


def test_lp_start_never_worse_than_best_grid_point():
    """A parabola clamped onto a grid end must not beat a better grid point (the loss zig-zags over p)."""
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


def test_w8a8_lapq_keeps_relu6_layers_fused(tmp_path):
    """A Relu6 whose clip the search lifted past 6 would stay in the graph, and ONNX Runtime
    would run its layer in float: at W8A8 every clip stays at most 6 and every convolution fuses."""
    model = relu6_model()
    result = onnx_lapq.quantize(model, random_inputs(model, 64, batch=16), config=lapq_config(weight_bits=8, act_bits=8))
    assert max(a["range"][1] for a in result.report["activations"] if a["group"] in ("clip1", "clip2")) <= 6.0
    optimized = tmp_path / "optimized.onnx"
    ort_session(result.model, optimize=True, optimized_path=optimized)
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 3 and "Clip" not in ops and "FusedConv" not in ops


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

