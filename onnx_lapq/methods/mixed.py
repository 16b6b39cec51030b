"""Mixed precision as a stage: each layer's weight width, chosen under a budget.

The run's plan has every weight at the widest candidate.  The stage measures, with loss
evaluators that take every weight dequantized, the calibration loss increase of each layer at
each narrower candidate with every other weight at the widest (sensitivity.py; the probes run
on the options' executor; where the run reconstructs weights, each probe's weight is
reconstructed for its width, probeweights.py; or, cheaper, a proxy from one random-noise
probe per layer, noiseprobe.py), optionally the interactions of neighbouring layers
(interactions.py), then solves the integer program of allocation.py: the least summed
increase whose weights fit the budget (``target_size`` of the float32 weights' bytes, counting
what the export stores: codes in their containers, scales and zero points; or ``target_bits``
per weight on average, counting the grids' widths; or ``target_bops`` of the bit operations
with float32 weights, bops.py).  Under an accuracy bound
(``max_loss_increase``, ``max_loss_ratio`` against the widest model's loss) it bisects over
the size budget, each step one allocation and one measurement of its loss, and keeps the
smallest allocation within the bound.  Every allocation tried is in the record (the
size/loss front, pareto.py).
It returns the widths as the Solution's ``layer_bits``; the pipeline plans the model again
at them before the later stages choose ranges.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..allocation import allocate, smallest_size
from ..bops import FLOAT_BITS, input_bits, layer_macs
from ..bits import LayerBits
from ..errors import ConfigError
from ..export import container
from ..largemodel import element_bits
from ..data import model_inputs
from ..options import CALIBRATORS
from ..plan import QuantPlan, WeightSite
from ..progress import Progress
from ..qmath import QFormat
from ..interactions import pair_terms
from ..noiseprobe import proxy_sensitivities
from ..probeweights import PROBE_SOLVER, probe_weights
from ..sensitivity import ProbeJob, WeightProbe, weight_sensitivities
from ..solution import Solution
from .base import RunContext, StageRecord
from .calibrators import activation_observers, choose_ranges
from .reconstruction import SOLVERS

SCALE_BYTES = 4  # one float32 scale per output channel (or per tensor, or per block)
BISECTION_TOLERANCE = 0.002  # an accuracy bound's bisection stops when the budget is known to this fraction of the float weights
MAX_TRIALS = 16  # ... or after this many allocations
TIE_BREAK = 1e-6  # of the largest cost: the price of narrowing a site whose narrowing measured free (allocation.MIP_GAP below it)


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionRecord(StageRecord):
    """Each layer's chosen width and measured sensitivities, the budget, the allocations tried
    (each one's budget, size, measured loss and widths) and which of them was chosen."""

    widths: dict[str, int]
    sensitivities: dict[str, dict[int, float]]
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
            "probe_weights": self.probe_weights, "sensitivity": self.sensitivity, "couplings": [{"layers": list(pair), "rho": rho} for pair, rho in self.couplings.items()],
            "budget_bytes": self.budget_bytes, "size_bytes": self.size_bytes, "float_bytes": self.float_bytes, "unit": self.unit,
            "baseline_loss": self.baseline_loss, "bound": self.bound, "trials": [t.report(self.float_bytes) for t in self.trials],
            "seconds": round(self.seconds, 3),
        }}

    def summary(self) -> str:
        counts = {b: sum(w == b for w in self.widths.values()) for b in sorted(set(self.widths.values()))}
        spread = ", ".join(f"{n} at {b} bits" for b, n in counts.items())
        limit = (f"loss bound {self.bound:.4g} ({len(self.trials)} allocations tried)" if self.bound is not None
                 else f"budget {self.budget_bytes / self.float_bytes:.3f}")
        measure = "bit operations" if self.unit == "bops" else "weights"
        return (f"mixed precision: {spread}; {measure} {self.size_bytes / self.float_bytes:.3f} of float32 "
                f"({limit}), {self.seconds:.0f} s")


@dataclass(frozen=True)
class MixedPrecision:
    """Choose each layer's weight width under the config's budget (see the module docstring)."""

    name: ClassVar[str] = "mixed_precision"
    keeps_batches: ClassVar[bool] = True

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return activation_observers(plan)

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, MixedPrecisionRecord]:
        started = time.perf_counter()
        config, plan = context.config, context.plan
        options = config.mixed_precision
        widths = tuple(sorted(set(options.candidate_bits)))
        sites = list(plan.weights)
        batches = list(model_inputs(context.batches, config.label_key))
        per_bit = layer_macs(context.model, sites, solution.weights, batches[0]) * input_bits(plan, context.model, sites) if options.target_bops else None
        sizes, budget, float_bytes, unit = _sizes(solution, sites, widths, options, config.symmetric_weights, per_bit)
        least = smallest_size(sizes)
        if budget < least:
            raise ConfigError(_infeasible(options, least, float_bytes, budget))
        method = config.method if config.method in CALIBRATORS else "mse"
        ranges = choose_ranges(solution, plan, context.stats, method, config.calibration, weight_symmetric=config.symmetric_weights,
                               act_symmetric=config.act_symmetric, weight_method=config.reconstruction.weight_clipping)
        probe = WeightProbe(plan, ranges, solution, config.reconstruction.weight_clipping, config.symmetric_weights, config.act_symmetric)
        proxy = options.sensitivity == "proxy"
        replaced = probe_weights(context.model, probe, widths, batches, config) if config.weight_rounding in SOLVERS and not proxy else {}
        job = ProbeJob(context.model, probe, batches, config.lapq.loss, config.lapq.memory_budget_mb << 20, replaced)
        notify = lambda done, total: context.notify(Progress("mixed_precision", done, total))  # noqa: E731
        if proxy:
            measured = proxy_sensitivities(job, widths, config.seed, options.executor, notify)
        else:
            measured = weight_sensitivities(job, widths, options.executor, notify)
        costs = _costs(measured, sites, widths, sizes)
        pairs, couplings = pair_terms(job, sites, widths, measured, options.executor, notify) if options.interactions else ({}, {})
        session = job.open()
        context.cleanup.callback(session.evaluator.close)

        losses: dict[tuple, float] = {}  # an allocation measured once, whatever budgets it answers

        def trial(limit: float | None) -> Trial:
            """The allocation within ``limit`` bytes, measured; None: every layer at the widest candidate."""
            chosen = allocate(costs, sizes, limit, pairs=pairs).choice if limit is not None else (len(widths) - 1,) * len(sites)
            choice = {s.node: widths[k] for s, k in zip(sites, chosen)}
            size = float(sum(sizes[l, k] for l, k in enumerate(chosen)))
            narrowed = tuple((s.tensor, choice[s.node]) for s in sites if choice[s.node] < s.bits)
            if narrowed not in losses:
                losses[narrowed] = session.baseline + (session.increase(narrowed) if narrowed else 0.0)
            return Trial(size if limit is None else limit, size, losses[narrowed], choice)

        bound = _bound(options, session.baseline)
        trials = bisect(trial, least, bound, BISECTION_TOLERANCE * float_bytes) if bound is not None else (trial(budget),)
        best = min((t for t in trials if bound is None or t.loss <= bound), key=lambda t: t.size)
        layer_bits = tuple(LayerBits(node, weight_bits=bits) for node, bits in best.widths.items())
        record = MixedPrecisionRecord(stage=self.name, widths=best.widths, sensitivities=measured, probe_weights=PROBE_SOLVER if replaced else "nearest",
                                      sensitivity=options.sensitivity, couplings=couplings, budget_bytes=best.budget, size_bytes=best.size, float_bytes=float_bytes,
                                      unit=unit, baseline_loss=session.baseline, bound=bound,
                                      trials=trials, seconds=time.perf_counter() - started)
        return solution.but(layer_bits=layer_bits), record


@dataclass(frozen=True)
class Trial:
    """One allocation: the budget it was solved under, its size, its measured calibration loss, its widths."""

    budget: float
    size: float
    loss: float
    widths: dict[str, int]

    def report(self, float_bytes: float) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "size_bytes": self.size, "size_fraction": self.size / float_bytes, "loss": self.loss, "widths": self.widths}


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


def _costs(measured: dict[str, dict[int, float]], sites: list[WeightSite], widths: tuple[int, ...], sizes: np.ndarray) -> np.ndarray:
    """The program's cost of each site at each width: its measured loss increase, never below
    0 (a narrow reconstructed weight that measures below the widest alone does not beside
    others), plus a tie-break far below any measured difference that keeps a site at its
    widest until the budget needs its bytes (and off widths that save none: 3 bits stored in
    int8 cost the bytes of 8)."""
    increase = np.array([[0.0 if b >= s.bits else max(measured[s.node][b], 0.0) for b in widths] for s in sites])
    tie = TIE_BREAK * max(float(increase.max()), np.finfo(np.float64).tiny)
    narrower = (1.0 - sizes / sizes.max(axis=1, keepdims=True)) + (1.0 - np.asarray(widths) / max(widths))  # bytes saved, then bits given up
    return increase + tie * narrower


def _sizes(solution: Solution, sites: list[WeightSite], widths: tuple[int, ...], options, symmetric: bool,
           per_bit: np.ndarray | None) -> tuple[np.ndarray, float, float, str]:
    """(size of each site at each width [sites, widths], the budget, the float32 weights' size,
    the unit): sizes in the budget's unit, "bytes" as stored or, for ``target_bits``, "bits"
    (the grids' bits / 8), or for ``target_bops`` "bops" (``per_bit``: each site's bit
    operations per weight bit, its MACs × input bits); an accuracy bound's budget is every site
    at its widest."""
    if per_bit is not None:
        full = FLOAT_BITS * float(per_bit.sum())
        return np.outer(per_bit, widths), options.target_bops * full, full, "bops"
    count = sum(solution.weights[s.tensor].size for s in sites)
    float_bytes = 4.0 * count
    if options.target_bits is not None:  # average bits of the codes
        sizes = np.array([[solution.weights[s.tensor].size * b / 8 for b in widths] for s in sites])
        return sizes, options.target_bits * count / 8, float_bytes, "bits"
    sizes = np.array([[weight_bytes(solution, s, b, symmetric) for b in widths] for s in sites])  # codes, scales, zero points
    budget = options.target_size * float_bytes if options.target_size is not None else float(sizes.max(axis=1).sum())
    return sizes, budget, float_bytes, "bytes"


def weight_bytes(solution: Solution, site: WeightSite, bits: int, symmetric: bool) -> float:
    """Bytes the export stores for a weight at ``bits``: its codes in their container (4-bit
    types packed two to a byte; 2, 3, 5-7 bits in 8-bit integers), a float32 scale and a zero
    point in the codes' container per channel."""
    weight = solution.weights[site.tensor]
    channels = weight.shape[site.axis] if site.axis is not None else 1
    stored = element_bits(container(QFormat(bits, signed=True, symmetric=symmetric)))
    return -(-weight.size * stored // 8) + channels * SCALE_BYTES + -(-channels * stored // 8)


def _infeasible(options, least: float, float_bytes: float, budget: float) -> str:
    if options.target_bops is not None:
        return (f"target_bops={options.target_bops} is below the fewest bit operations the candidate widths allow "
                f"({least / float_bytes:.4f} of those with float weights): give at least {np.ceil(least / float_bytes * 1e4) / 1e4}")
    if options.target_size is not None:
        return (f"target_size={options.target_size} is below the smallest model the candidate widths allow "
                f"({least / float_bytes:.4f} of the float weights): give at least {np.ceil(least / float_bytes * 1e4) / 1e4}")
    return (f"target_bits={options.target_bits} is below what the narrowest candidate reaches "
            f"({min(options.candidate_bits)} bits a weight): give at least {min(options.candidate_bits)}")
