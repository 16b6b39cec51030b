"""Budgeted derivative-free minimization of the calibration loss over the vector x.

``powell``: scipy.optimize.minimize(method="Powell") over all coordinates (the LAPQ
paper's choice), starting with small steps.  ``coordinate``: one bounded scalar
minimization per coordinate in the order of x (params.ParamSpace), repeated for a number of sweeps; each step
changes one site, which the loss evaluator's prefix cache makes cheap.  Both stop on
``max_evals`` or ``time_limit`` and always return the best point seen.

Every point the optimizer proposes is rounded to the lattice of ``step`` and clamped to
the bounds (bounds that are not multiples of ``step`` are the only values off the
lattice), and each point is evaluated once (a repeat is answered from memory
and costs no budget).  Without the lattice, scipy's Brent line search (its tolerance is
relative to the step length) keeps halving its step towards a minimum at the current
point and can spend most of a budget on points next to ones already measured, where the
loss differs by rounding noise alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import optimize


@dataclass(frozen=True)
class SearchResult:
    """scipy-style result: best x, its loss, evaluations, iterations, why it stopped, and the trace."""

    x: np.ndarray
    fun: float
    nfev: int
    nit: int
    success: bool
    message: str
    trace: list = field(default_factory=list)  # (evaluation, best loss so far) at each improvement
    seconds: float = 0.0
    next_axis: int = 0  # the coordinate a continued search should start from (see ``minimize``)


# Powell's first step along each coordinate (log clip factor 0.2: about 22%).  Its line
# searches bracket from the current point outwards; scipy's bounded variant instead
# samples the whole bounded interval and misses the narrow basin around a good start.
POWELL_STEP = 0.2


class _BudgetSpent(Exception):
    pass


class _Tracked:
    """The objective on the lattice of ``step`` within the bounds, with a budget, a memory of
    the points already evaluated, the best point seen and an improvement trace."""

    def __init__(self, fun: Callable[[np.ndarray], float], bounds, step: float, max_evals: int, time_limit: float | None, on_eval):
        self.fun, self.step, self.max_evals, self.on_eval = fun, step, max_evals, on_eval
        self.lower, self.upper = np.array(bounds, np.float64).reshape(-1, 2).T
        self.deadline = None if time_limit is None else time.perf_counter() + time_limit
        self.nfev, self.best_x, self.best_f, self.trace, self.seen = 0, None, np.inf, [], {}
        self.axis = 0  # the one coordinate in which the last point asked for differs from the best, if one
        self.iterations = 0  # Powell iterations or coordinate sweeps completed

    def iteration_done(self, _=None) -> None:
        self.iterations += 1

    def __call__(self, x: np.ndarray) -> float:
        x = np.asarray(x, np.float64)
        if self.step > 0:
            x = np.round(x / self.step) * self.step
        x = np.clip(x, self.lower, self.upper) + 0.0  # + 0.0: -0.0 and 0.0 are one point
        if self.best_x is not None:
            moved = np.flatnonzero(x != self.best_x)
            if len(moved) == 1:
                self.axis = int(moved[0])
        key = x.tobytes()
        if key in self.seen:
            return self.seen[key]
        if self.nfev >= self.max_evals or (self.deadline is not None and time.perf_counter() > self.deadline):
            raise _BudgetSpent
        value = float(self.fun(x))
        self.nfev += 1
        self.seen[key] = value
        if value < self.best_f:
            self.best_x, self.best_f = np.array(x, np.float64), value
            self.trace.append((self.nfev, value))
        if self.on_eval is not None:
            self.on_eval(self.nfev, self.best_f)
        return value


def minimize(
    fun: Callable[[np.ndarray], float],
    x0: np.ndarray,
    bounds: list[tuple[float, float]],
    *,
    method: str = "powell",
    max_evals: int,
    time_limit: float | None = None,
    iterations: int = 2,
    step: float = 0.0,
    first_axis: int = 0,
    on_eval: Callable[[int, float], None] | None = None,
) -> SearchResult:
    """Minimize ``fun`` from ``x0`` within ``bounds``, the budgets and ``iterations`` Powell
    iterations or coordinate sweeps, on the lattice of ``step`` (0: none).

    The first iteration or sweep visits the coordinates from ``first_axis`` on, then the
    ones before it.  A search that a budget stops reports in ``next_axis`` the coordinate
    it was on (the last one it moved alone; 0 when it ends by itself), so that a continued
    search takes up the coordinates it had not reached instead of starting over at the first."""
    started = time.perf_counter()
    tracked = _Tracked(fun, bounds, step, max_evals, time_limit, on_eval)
    message, success = "", True
    order = np.roll(np.arange(len(x0)), -first_axis)
    try:
        tracked(x0)
        if method == "powell":
            res = optimize.minimize(
                tracked, x0, method="Powell", callback=tracked.iteration_done,
                options={"maxiter": iterations, "xtol": 1e-2, "ftol": 1e-4, "direc": POWELL_STEP * np.eye(len(x0))[order]},
            )
            message = str(res.message)
        else:
            _coordinate_descent(tracked, np.array(x0, np.float64), bounds, iterations, order)
            message = f"completed {tracked.iterations} coordinate sweeps"
    except _BudgetSpent:
        success, message = False, "stopped by its budget (max_evals or time_limit)"  # nfev says after how many
    next_axis = tracked.axis if not success else 0
    return SearchResult(
        x=np.array(x0, np.float64) if tracked.best_x is None else tracked.best_x, fun=tracked.best_f, nfev=tracked.nfev,
        nit=tracked.iterations, success=success,
        message=message, trace=tracked.trace, seconds=time.perf_counter() - started, next_axis=next_axis,
    )


def _coordinate_descent(tracked: _Tracked, x: np.ndarray, bounds: list[tuple[float, float]], sweeps: int, order: np.ndarray) -> None:
    best = tracked.best_f
    for _ in range(sweeps):
        start = best
        for i in map(int, order):
            lo, hi = bounds[i]
            def along(value: float, i=i) -> float:
                trial = x.copy()
                trial[i] = value
                return tracked(trial)

            res = optimize.minimize_scalar(along, bounds=(max(lo, x[i] - 1.0), min(hi, x[i] + 0.5)), method="bounded", options={"xatol": 1e-2, "maxiter": 12})
            if res.fun < best:
                x[i], best = float(res.x), float(res.fun)
        tracked.iteration_done()
        if start - best <= 1e-4 * max(abs(start), 1e-12):
            return
