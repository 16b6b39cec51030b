"""LAPQ: Lp initialization, the budgeted joint search, its evaluator's life cycle and its report."""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import onnx
import pytest
from conftest import DIGITS_CALIB, DIGITS_MODEL, block_model, init_array, ort_session, random_inputs, relu6_model, run_cli

import onnx_lapq
from onnx_lapq.evaluator import LossEvaluator
from onnx_lapq.graph import INT4_OPSET, normalize
from onnx_lapq.methods.lapq_search import parabola_minimum
from onnx_lapq.params import ParamSpace, SiteRanges
from onnx_lapq.plan import build_plan
from onnx_lapq.runtime import session
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
