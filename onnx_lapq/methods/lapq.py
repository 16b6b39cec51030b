"""LAPQ as a stage: the loss evaluator, the start, the joint search, and bias correction's race.

The stage evaluates the end-to-end calibration loss (evaluator) on a seeded subset of the
calibration batches, starts from the best of the Lp sweep and the start calibrators, and
searches every clipping value jointly (lapq_search.py).  Whether bias correction, when an
earlier stage switched it on, stays on in the search is network-specific, and the losses
after some searching tell where the start's do not: by default ("race") a search runs each
way on a quarter of the budget and the lower one continues; "auto" keeps correction only
where it cuts the min/max start's loss more than BIAS_CORRECTION_ESSENTIAL times; "on" and
"off" decide for every network.  A race is skipped where correction leaves the min/max
start's loss exactly as it is: both sides would search alike.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..data import model_inputs
from ..journal import JournaledLoss
from ..evaluator import LossEvaluator
from ..params import ParamSpace, SiteRanges
from ..plan import QuantPlan
from ..progress import Progress
from ..runtime import release_shared_arena
from ..solution import Solution
from .base import RunContext
from .calibrators import activation_observers, choose_ranges
from .lapq_record import LapqRecord, RaceRecord, evaluator_record
from .lapq_search import resume, run_lapq

START_CALIBRATORS = ("minmax", "entropy")  # start candidates besides the Lp sweep (min/max: the p -> infinity limit)
BIAS_CORRECTION_ESSENTIAL = 2.0


@dataclass(frozen=True)
class Lapq:
    """Loss-aware post-training quantization (Nahshan et al. 2019) of every clipping value."""

    name: ClassVar[str] = "lapq"
    keeps_batches: ClassVar[bool] = True

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return activation_observers(plan)

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, LapqRecord]:
        config, options, plan = context.config, context.config.lapq, context.plan
        context.notify(Progress("start", 0, None))
        batches = subset(context.batches, options.search_samples, config.batch_size, np.random.default_rng(config.seed))
        labels = np.concatenate([b[config.label_key] for b in batches]) if config.label_key else None
        inputs = list(model_inputs(batches, config.label_key))

        def ranges_of(method: str, p: float | None = None) -> SiteRanges:
            return choose_ranges(
                solution, plan, context.stats, method, config.calibration,
                weight_symmetric=config.symmetric_weights, act_symmetric=config.act_symmetric, lp_norm=p,
            )

        @functools.cache  # each side of the race sweeps the same grid, and a resumed run sweeps it again
        def ranges_at_p(p: float) -> SiteRanges:
            return ranges_of("lp", float(p))

        means = None if options.search_bias_correction == "off" else solution.input_means
        evaluator = LossEvaluator(
            context.model, plan, inputs, context.params(ranges_at_p(options.lp_grid[0])), loss=options.loss, labels=labels,
            memory_budget=options.memory_budget_mb << 20, solution=solution.but(input_means=means),
        )
        context.keep_evaluator(evaluator, functools.partial(_release, evaluator))
        evaluate = evaluator if context.journal is None else JournaledLoss(evaluator, context.journal)
        starts = {m: ranges_of(m) for m in START_CALIBRATORS}

        def correct(on: bool) -> None:
            evaluator.use(solution.but(input_means=means if on else None))

        if means and options.search_bias_correction in ("auto", "race"):  # the min/max start with and without
            start = context.params(starts["minmax"])
            corrected = evaluate(start)
            correct(False)
            plain = evaluate(start)
            needed = plain > BIAS_CORRECTION_ESSENTIAL * corrected if options.search_bias_correction == "auto" else plain != corrected
            if needed:
                correct(True)
            else:
                means = None

        def loss_of(ranges: SiteRanges) -> float:
            return evaluate(context.params(ranges))

        def space_for(ranges: SiteRanges) -> ParamSpace:
            return ParamSpace(plan, ranges, frozenset(solution.weight_grids))

        best_shown = [np.inf]  # across the race's two searches and the continuation

        def progress(spent: int):
            def report(n: int, best: float) -> None:
                best_shown[0] = min(best_shown[0], best)
                context.notify(Progress("search", spent + n, options.max_evals, best_shown[0]))
            return report

        searching = {"search": options.search, "iterations": options.search_iterations, "step": options.search_step}
        race = None
        if means and options.search_bias_correction == "race" and options.max_evals >= 2:  # a search each way
            outcome, race = _race(correct, options, lambda max_evals, time_limit, spent: run_lapq(
                ranges_at_p, starts, loss_of, space_for, lp_grid=options.lp_grid, max_evals=max_evals, time_limit=time_limit,
                on_eval=progress(spent), **searching,
            ))
            means = means if race.kept else None
            remaining = options.max_evals - race.evaluations
            if remaining > 0 and (options.time_limit is None or race.seconds < options.time_limit):
                outcome = resume(
                    outcome, loss_of, space_for, max_evals=remaining,
                    time_limit=None if options.time_limit is None else options.time_limit - race.seconds,
                    spent=race.evaluations, on_eval=progress(0), **searching,
                )
        else:
            outcome = run_lapq(
                ranges_at_p, starts, loss_of, space_for, lp_grid=options.lp_grid, max_evals=options.max_evals,
                time_limit=options.time_limit, on_eval=progress(0), **searching,
            )
        record = LapqRecord(
            stage=self.name, start_ranges=outcome.initial_ranges, outcome=outcome, loss=evaluator.kind,
            evaluator=evaluator_record(evaluator), bias_correction=means is not None, race=race,
            replayed_evaluations=None if context.journal is None else evaluate.replayed,
        )
        return solution.but(ranges=outcome.ranges, input_means=means), record


def _release(evaluator: LossEvaluator) -> None:
    """Stop the evaluator and give the memory its sessions held in the shared arena back to the system."""
    evaluator.close()
    release_shared_arena()


def _race(correct, options, search):
    """The race: a search with bias correction and one without (``correct(on)`` switches the
    evaluator), each on a quarter of the budgets (``search(max_evals, time_limit, spent)``);
    the evaluator keeps the setting whose search ended lower.  Returns the winner's outcome,
    its nfev, trace and seconds those of the whole race (the trace numbered as the
    evaluations ran), and the :class:`RaceRecord`."""
    started = time.perf_counter()
    quarter = max(1, options.max_evals // 4)
    quarter_time = None if options.time_limit is None else options.time_limit / 4
    outcomes = {}
    for keep in (True, False):
        correct(keep)
        outcomes[keep] = search(quarter, quarter_time, sum(o.search.nfev for o in outcomes.values()))
    kept = outcomes[True].search.fun < outcomes[False].search.fun
    correct(kept)
    before = 0 if kept else outcomes[True].search.nfev  # the winner's evaluations came after these
    winner = outcomes[kept]
    race = RaceRecord(
        on=outcomes[True].search.fun, off=outcomes[False].search.fun, kept=kept,
        evaluations=outcomes[True].search.nfev + outcomes[False].search.nfev, seconds=time.perf_counter() - started,
    )
    counted = replace(  # nfev, trace and seconds of the whole race, as if one search
        winner.search, nfev=race.evaluations, trace=[(before + n, v) for n, v in winner.search.trace],
        seconds=outcomes[True].search.seconds + outcomes[False].search.seconds,
    )
    return replace(winner, search=counted), race


def subset(batches: list[dict[str, np.ndarray]], size: int | None, batch_size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A seeded random subset of ``size`` samples, in order and re-batched (all when None or too few).

    Batches of different shapes (e.g. sequence lengths) are sampled whole."""
    rows = [len(next(iter(b.values()))) for b in batches]
    if size is None or size >= sum(rows):
        return batches
    if len({tuple(v.shape[1:] for v in b.values()) for b in batches}) > 1:
        order = rng.permutation(len(batches))
        keep, count = [], 0
        for i in order:
            if count >= size:
                break
            keep.append(i)
            count += rows[i]
        return [batches[i] for i in sorted(keep)]
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    chosen = np.sort(rng.choice(sum(rows), size, replace=False))
    return [{k: v[chosen[i:i + batch_size]] for k, v in joined.items()} for i in range(0, size, batch_size)]
