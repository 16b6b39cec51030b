"""The search (onnx_lapq.search.minimize) and its space (params.ParamSpace): Powell and
coordinate descent on the step lattice, best point kept, bounds and budgets, continuation
from the coordinate a budget stopped on, and the coordinates a plan gives."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import block_model, relu6_model

import onnx_lapq
from onnx_lapq.graph import INT4_OPSET, normalize
from onnx_lapq.params import ParamSpace, SiteRanges
from onnx_lapq.plan import build_plan
from onnx_lapq.search import _Tracked, minimize


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
