"""LAPQ (Nahshan et al. 2019): Lp-norm initialization, then a joint search of all clipping values.

1. For each p of the grid, every site is clipped at its Lp-optimal range (activations
   from their histograms, weights exactly) and the end-to-end loss is measured.
2. A parabola fitted to loss(p) gives p* (clamped to the grid); when the fit is not
   convex, or p* does worse than the best grid point, the best grid point is used.
   Calibrators' ranges are start candidates too, judged by the same loss: min/max (the
   p -> infinity limit), which often wins at 8 bits where clipping rarely pays, and
   entropy (KL), whose clipping of heavy-tailed activations often wins at 4 bits.
3. From the best start, ``search.minimize`` tunes the vector of log clip factors
   (one per activation group, one per weight layer) against the same loss.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..params import ParamSpace, SiteRanges
from ..search import SearchResult, minimize


@dataclass(frozen=True)
class LapqOutcome:
    """The searched ranges and what the report needs about how they were found."""

    ranges: SiteRanges
    initial_ranges: SiteRanges
    p_star: float | None  # None: a calibrator's start won (see ``start``)
    start: str  # "lp" or the name of the calibrator the search started from
    p_losses: dict[float, float]
    start_losses: dict[str, float]
    init_loss: float
    search: SearchResult


def resume(
    outcome: LapqOutcome,
    loss_of: Callable[[SiteRanges], float],
    space_for: Callable[[SiteRanges], ParamSpace],
    *,
    search: str,
    max_evals: int,
    time_limit: float | None,
    iterations: int,
    step: float,
    spent: int,
    on_eval: Callable[[int, float], None] | None = None,
) -> LapqOutcome:
    """``outcome``'s search continued from its best ranges with a fresh budget, from the
    coordinate it had stopped on; ``spent``: the evaluations made before (``outcome``'s own
    and any others, such as a losing race), which count in the result's ``nfev`` too."""
    first = outcome.search
    space, more = _search_from(
        outcome.ranges, loss_of, space_for, search=search, max_evals=max_evals, time_limit=time_limit, iterations=iterations,
        step=step, first_axis=first.next_axis, on_eval=None if on_eval is None else (lambda n, best: on_eval(spent + n, min(best, first.fun))),
    )
    better = more.fun < first.fun
    merged = dataclasses.replace(
        more, x=more.x if better else np.zeros(space.size), fun=min(more.fun, first.fun), nfev=spent + more.nfev, nit=first.nit + more.nit,
        trace=first.trace + [(spent + n, v) for n, v in more.trace if v < first.fun], seconds=first.seconds + more.seconds,
    )
    return dataclasses.replace(outcome, ranges=space.ranges(merged.x), search=merged)


def _search_from(
    initial: SiteRanges,
    loss_of: Callable[[SiteRanges], float],
    space_for: Callable[[SiteRanges], ParamSpace],
    *,
    search: str,
    **budgets,
) -> tuple[ParamSpace, SearchResult]:
    """``search.minimize`` over the log clip factors of ``initial`` (x = 0 is ``initial``),
    with the budgets, lattice step, ``first_axis`` and ``on_eval`` it takes; the space and the result."""
    space = space_for(initial)
    return space, minimize(lambda x: loss_of(space.ranges(x)), np.zeros(space.size), space.bounds, method=search, **budgets)


def parabola_minimum(ps: list[float], losses: list[float]) -> float | None:
    """Vertex of the least-squares parabola through (p, loss), clamped to the grid; None if not convex."""
    if len(ps) < 3:
        return None
    a, b, _ = np.polyfit(np.asarray(ps, np.float64), np.asarray(losses, np.float64), 2)
    if not a > 0:
        return None
    return float(np.clip(-b / (2 * a), min(ps), max(ps)))


def run_lapq(
    ranges_at_p: Callable[[float], SiteRanges],
    calibrated: dict[str, SiteRanges],
    loss_of: Callable[[SiteRanges], float],
    space_for: Callable[[SiteRanges], ParamSpace],
    *,
    lp_grid: tuple[float, ...],
    search: str,
    max_evals: int,
    time_limit: float | None,
    iterations: int,
    step: float,
    on_eval: Callable[[int, float], None] | None = None,
) -> LapqOutcome:
    """Run the three steps above; ``loss_of`` is the end-to-end calibration loss of ranges.
    ``time_limit`` covers the start candidates' evaluations too: the search gets what they left."""
    started = time.perf_counter()
    losses = {float(p): loss_of(ranges_at_p(p)) for p in lp_grid}
    best_p = min(losses, key=losses.get)
    p_star = parabola_minimum(list(losses), list(losses.values()))
    if p_star is None:
        p_star = best_p
    elif p_star not in losses:
        losses[p_star] = loss_of(ranges_at_p(p_star))
    if losses[p_star] > losses[best_p]:  # a vertex (or a clamped grid end) that does worse than the best grid point
        p_star = best_p
    initial, init_loss, start = ranges_at_p(p_star), losses[p_star], "lp"
    start_losses = {name: loss_of(ranges) for name, ranges in calibrated.items()}
    for name, loss in start_losses.items():
        if loss < init_loss:
            initial, init_loss, p_star, start = calibrated[name], loss, None, name
    left = None if time_limit is None else time_limit - (time.perf_counter() - started)
    space, result = _search_from(
        initial, loss_of, space_for, search=search, max_evals=max_evals, time_limit=left, iterations=iterations, step=step, on_eval=on_eval,
    )
    if result.fun > init_loss:  # cannot happen (x0 is evaluated first) unless the loss is noisy
        result = dataclasses.replace(result, x=np.zeros(space.size), fun=init_loss)
    return LapqOutcome(
        ranges=space.ranges(result.x), initial_ranges=initial, p_star=p_star, start=start,
        p_losses=dict(sorted(losses.items())), start_losses=start_losses, init_loss=init_loss, search=result,
    )
