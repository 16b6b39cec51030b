"""Mixed precision as a stage: each layer's weight width (and input width), chosen under a budget.

The run's plan has every weight and activation at the widest candidate.  The stage
measures, with loss evaluators that take any widths, the calibration loss increase of each
layer at each narrower candidate with every other weight at the widest, and with candidate
activation widths that of each activation group at each narrower one, its range chosen for
that width by the run's calibrator, mse under lapq (sensitivity.py; the probes run on the
options' executor; where the run reconstructs weights, each probe's weight is
reconstructed for its width, probeweights.py; or, cheaper, a proxy from one random-noise
probe per layer, noiseprobe.py), optionally the interactions of neighbouring layers
(interactions.py), then solves the integer program of allocation.py over each layer's
candidates (widthcosts.py): the least summed increase whose weights fit the budget
(``target_size`` of the float32 weights' bytes, counting what the export stores: codes in
their containers, scales and zero points; or ``target_bits`` per weight on average,
counting the grids' widths; or ``target_bops`` of the bit operations with float32 weights,
bops.py, the budget under which input widths are chosen: layers reading one activation
take one width for it).  Under an accuracy bound (``max_loss_increase``,
``max_loss_ratio`` against the widest model's loss) it bisects over the size budget, each
step one allocation and one measurement of its loss, and keeps the smallest allocation
within the bound.  Every allocation tried is in the record (the size/loss front, pareto.py).
It returns the widths as the Solution's ``layer_bits``; the pipeline plans the model again
at them before the later stages choose ranges.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..allocation import allocate, smallest_size
from ..bops import input_bits, input_groups, layer_macs
from ..bits import LayerBits
from ..errors import ConfigError
from ..data import model_inputs
from ..options import CALIBRATORS
from ..plan import QuantPlan
from ..progress import Progress
from ..interactions import pair_terms
from ..noiseprobe import proxy_sensitivities
from ..probeweights import PROBE_SOLVER, probe_weights
from ..sensitivity import ProbeJob, WidthProbe, activation_sensitivities, weight_sensitivities
from ..solution import Solution
from ..widthcosts import Candidates, costs, infeasible, sizes
from .base import RunContext, StageRecord
from .calibrators import activation_observers, choose_ranges
from .reconstruction import SOLVERS

BISECTION_TOLERANCE = 0.002  # an accuracy bound's bisection stops when the budget is known to this fraction of the float weights
MAX_TRIALS = 16  # ... or after this many allocations


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionRecord(StageRecord):
    """Each layer's chosen widths and measured sensitivities, the budget, the allocations tried
    (each one's budget, size, measured loss and widths) and which of them was chosen."""

    widths: dict[str, int]
    act_widths: dict[str, int]  # node -> its input's bits, where input widths are chosen
    sensitivities: dict[str, dict[int, float]]
    act_sensitivities: dict[str, dict[int, float]]  # activation group -> {bits: ΔL}
    probe_weights: str
    sensitivity: str
    couplings: dict[tuple[str, str], float]
    budget_bytes: float
    size_bytes: float
    float_bytes: float
    unit: str  # of the three above: "bytes" as stored, "bits" (the codes' bits / 8) or "bops" (bit operations)
    baseline_loss: float
    bound: float | None
    trials: tuple[Trial, ...]
    seconds: float

    def report(self) -> dict[str, Any]:
        return {"mixed_precision": {
            "widths": self.widths, "sensitivities": {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivities.items()},
            "act_widths": self.act_widths, "act_sensitivities": {g: {str(b): v for b, v in s.items()} for g, s in self.act_sensitivities.items()},
            "probe_weights": self.probe_weights, "sensitivity": self.sensitivity, "couplings": [{"layers": list(pair), "rho": rho} for pair, rho in self.couplings.items()],
            "budget_bytes": self.budget_bytes, "size_bytes": self.size_bytes, "float_bytes": self.float_bytes, "unit": self.unit,
            "baseline_loss": self.baseline_loss, "bound": self.bound, "trials": [t.report(self.float_bytes) for t in self.trials],
            "seconds": round(self.seconds, 3),
        }}

    def summary(self) -> str:
        counts = {b: sum(w == b for w in self.widths.values()) for b in sorted(set(self.widths.values()))}
        spread = ", ".join(f"{n} at {b} bits" for b, n in counts.items())
        if self.act_widths:
            inputs = {b: sum(a == b for a in self.act_widths.values()) for b in sorted(set(self.act_widths.values()))}
            spread += "; inputs " + ", ".join(f"{n} at {b} bits" for b, n in inputs.items())
        limit = (f"loss bound {self.bound:.4g} ({len(self.trials)} allocations tried)" if self.bound is not None
                 else f"budget {self.budget_bytes / self.float_bytes:.3f}")
        measure = "bit operations" if self.unit == "bops" else "weights"
        return (f"mixed precision: {spread}; {measure} {self.size_bytes / self.float_bytes:.3f} of float32 "
                f"({limit}), {self.seconds:.0f} s")


@dataclass(frozen=True)
class MixedPrecision:
    """Choose each layer's weight width (and input width) under the config's budget (see the module docstring)."""

    name: ClassVar[str] = "mixed_precision"
    keeps_batches: ClassVar[bool] = True

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return activation_observers(plan)

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, MixedPrecisionRecord]:
        started = time.perf_counter()
        config, plan = context.config, context.plan
        options = config.mixed_precision
        widths = tuple(sorted(set(options.candidate_bits))) or (config.weight_bits,)
        act_widths = tuple(sorted(set(options.candidate_act_bits)))
        sites = list(plan.weights)
        batches = list(model_inputs(context.batches, config.label_key))
        candidates = Candidates.of(widths, act_widths, input_groups(plan, context.model, sites))
        macs = layer_macs(context.model, sites, solution.weights, batches[0]) if options.target_bops else None
        table, budget, float_bytes, unit = sizes(solution, sites, candidates, options, config.symmetric_weights, macs,
                                                 input_bits(plan, context.model, sites))
        ties = candidates.ties()
        least = smallest_size(table, ties)
        if budget < least:
            raise ConfigError(infeasible(options, least, float_bytes))
        method = config.method if config.method in CALIBRATORS else "mse"
        ranges = choose_ranges(solution, plan, context.stats, method, config.calibration, weight_symmetric=config.symmetric_weights,
                               act_symmetric=config.act_symmetric, weight_method=config.reconstruction.weight_clipping)
        act_ranges = {b: _act_ranges(solution, plan, context.stats, method, config, b) for b in act_widths if b < config.act_bits}
        probe = WidthProbe(plan, ranges, solution, config.reconstruction.weight_clipping, config.symmetric_weights, config.act_symmetric,
                           act_ranges=act_ranges)
        proxy = options.sensitivity == "proxy"
        replaced = probe_weights(context.model, probe, widths, batches, config) if config.weight_rounding in SOLVERS and not proxy else {}
        job = ProbeJob(context.model, probe, batches, config.lapq.loss, config.lapq.memory_budget_mb << 20, replaced)
        notify = lambda done, total: context.notify(Progress("mixed_precision", done, total))  # noqa: E731
        if proxy:
            measured = proxy_sensitivities(job, widths, config.seed, options.executor, notify)
        else:
            measured = weight_sensitivities(job, widths, options.executor, notify)
        act_measured = activation_sensitivities(job, set(candidates.groups) - {None}, act_widths, options.executor, notify) if act_widths else {}
        cost = costs(measured, act_measured, sites, candidates, table, {g: plan.group_bits(g) for g in plan.groups})
        pairs, couplings = pair_terms(job, sites, widths, measured, options.executor, notify) if options.interactions else ({}, {})
        pairs = {lm: candidates.expand(term, widths) for lm, term in pairs.items()}
        session = job.open()
        context.cleanup.callback(session.evaluator.close)

        losses: dict[tuple, float] = {}  # an allocation measured once, whatever budgets it answers

        def trial(limit: float | None) -> Trial:
            """The allocation within ``limit`` (in the budget's unit), measured; None: every layer at the widest candidate."""
            chosen = allocate(cost, table, limit, pairs=pairs, ties=ties).choice if limit is not None else (candidates.widest,) * len(sites)
            picked = [candidates.pairs[k] for k in chosen]
            size = float(sum(table[l, k] for l, k in enumerate(chosen)))
            narrowed = tuple((s.tensor, w) for s, (w, _) in zip(sites, picked) if w < s.bits)
            narrowed += tuple(dict.fromkeys((g, a) for g, (_, a) in zip(candidates.groups, picked) if g is not None and a < plan.group_bits(g)))
            if narrowed not in losses:
                losses[narrowed] = session.baseline + (session.increase(narrowed) if narrowed else 0.0)
            act = {s.node: a for s, g, (_, a) in zip(sites, candidates.groups, picked) if g is not None}
            return Trial(size if limit is None else limit, size, losses[narrowed], {s.node: w for s, (w, _) in zip(sites, picked)}, act)

        bound = _bound(options, session.baseline)
        trials = bisect(trial, least, bound, BISECTION_TOLERANCE * float_bytes) if bound is not None else (trial(budget),)
        best = min((t for t in trials if bound is None or t.loss <= bound), key=lambda t: t.size)
        layer_bits = tuple(LayerBits(node, weight_bits=bits, act_bits=best.act_widths.get(node)) for node, bits in best.widths.items())
        record = MixedPrecisionRecord(stage=self.name, widths=best.widths, act_widths=best.act_widths, sensitivities=measured,
                                      act_sensitivities=act_measured, probe_weights=PROBE_SOLVER if replaced else "nearest",
                                      sensitivity=options.sensitivity, couplings=couplings, budget_bytes=best.budget, size_bytes=best.size, float_bytes=float_bytes,
                                      unit=unit, baseline_loss=session.baseline, bound=bound,
                                      trials=trials, seconds=time.perf_counter() - started)
        return solution.but(layer_bits=layer_bits), record


def _act_ranges(solution: Solution, plan: QuantPlan, stats, method: str, config, bits: int) -> dict[str, tuple[float, float]]:
    """Each activation group's range chosen by ``method`` for a grid of ``bits`` (the weights' are not wanted)."""
    narrowed = replace(plan, weights=(), biases=(), activations=tuple(replace(a, bits=bits) for a in plan.activations))
    return choose_ranges(solution, narrowed, stats, method, config.calibration, weight_symmetric=config.symmetric_weights,
                         act_symmetric=config.act_symmetric, weight_method=config.reconstruction.weight_clipping).activations


@dataclass(frozen=True)
class Trial:
    """One allocation: the budget it was solved under, its size, its measured calibration loss, its widths."""

    budget: float
    size: float
    loss: float
    widths: dict[str, int]
    act_widths: dict[str, int]  # node -> its input's bits, where input widths are chosen

    def report(self, float_bytes: float) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "size_bytes": self.size, "size_fraction": self.size / float_bytes, "loss": self.loss, "widths": self.widths,
                "act_widths": self.act_widths}


def bisect(trial, least: float, bound: float, tolerance: float) -> tuple[Trial, ...]:
    """The allocations tried bisecting the budget for the smallest whose loss stays within
    ``bound``: the smallest budget ``least`` first, then every layer at the widest candidate
    (within by definition, whatever the program would pick: a narrow reconstructed weight can
    measure below the widest alone and not beside others), then halves between the two until
    the interval is under ``tolerance``."""
    tried = [trial(least)]
    if tried[0].loss <= bound:
        return tuple(tried)
    tried.append(trial(None))
    low, high = least, tried[-1].size
    while high - low > tolerance and len(tried) < MAX_TRIALS:
        middle = (low + high) / 2
        step = trial(middle)
        tried.append(step)
        if step.loss <= bound:
            high = step.size
        else:
            low = middle
    return tuple(tried)


def _bound(options, baseline: float) -> float | None:
    """The loss bound of an accuracy-bound budget over the widest model's loss ``baseline``; None for a size budget."""
    if options.max_loss_increase is not None:
        return baseline + options.max_loss_increase
    if options.max_loss_ratio is not None:
        return baseline * options.max_loss_ratio
    return None


