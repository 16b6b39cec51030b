"""Mixed precision as a stage: each layer's weight width, chosen under a size budget.

The run's plan has every weight at the widest candidate.  The stage measures, through one
loss evaluator with dequantized weights, the calibration loss increase of each layer at each
narrower candidate with every other weight at the widest (sensitivity.py), then solves the
integer program of allocation.py: the least summed increase whose weights fit the budget
(``target_size`` of the float32 weights' bytes, counting what the export stores: codes in
their containers, scales and zero points; or ``target_bits`` per weight on average, counting
the grids' widths).
It returns the widths as the Solution's ``layer_bits``; the pipeline plans the model again
at them before the later stages choose ranges.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..allocation import allocate, smallest_size
from ..bits import LayerBits
from ..errors import ConfigError
from ..evaluator import LossEvaluator
from ..export import container
from ..largemodel import element_bits
from ..data import model_inputs
from ..options import CALIBRATORS
from ..plan import QuantPlan, WeightSite
from ..progress import Progress
from ..qmath import QFormat
from ..sensitivity import WeightProbe, weight_sensitivities
from ..solution import Solution
from .base import RunContext, StageRecord
from .calibrators import activation_observers, choose_ranges

SCALE_BYTES = 4  # one float32 scale per output channel (or per tensor, or per block)


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionRecord(StageRecord):
    """Each layer's chosen width and measured sensitivities, the budget and the size reached."""

    widths: dict[str, int]
    sensitivities: dict[str, dict[int, float]]
    budget_bytes: float
    size_bytes: float
    float_bytes: float
    seconds: float

    def report(self) -> dict[str, Any]:
        return {"mixed_precision": {
            "widths": self.widths, "sensitivities": {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivities.items()},
            "budget_bytes": self.budget_bytes, "size_bytes": self.size_bytes, "float_bytes": self.float_bytes, "seconds": round(self.seconds, 3),
        }}

    def summary(self) -> str:
        counts = {b: sum(w == b for w in self.widths.values()) for b in sorted(set(self.widths.values()))}
        spread = ", ".join(f"{n} at {b} bits" for b, n in counts.items())
        return (f"mixed precision: {spread}; weights {self.size_bytes / self.float_bytes:.3f} of float32 "
                f"(budget {self.budget_bytes / self.float_bytes:.3f}), {self.seconds:.0f} s measuring")


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
        count = sum(solution.weights[s.tensor].size for s in sites)
        float_bytes = 4.0 * count
        if options.target_bits is not None:  # average bits of the codes
            sizes = np.array([[solution.weights[s.tensor].size * b / 8 for b in widths] for s in sites])
            budget = options.target_bits * count / 8
        else:  # bytes as stored: codes, scales, zero points
            sizes = np.array([[weight_bytes(solution, s, b, config.symmetric_weights) for b in widths] for s in sites])
            budget = options.target_size * float_bytes
        least = smallest_size(sizes)
        if budget < least:
            raise ConfigError(_infeasible(options, least, float_bytes, budget))
        method = config.method if config.method in CALIBRATORS else "mse"
        ranges = choose_ranges(solution, plan, context.stats, method, config.calibration, weight_symmetric=config.symmetric_weights,
                               act_symmetric=config.act_symmetric, weight_method=config.reconstruction.weight_clipping)
        probe = WeightProbe(plan, ranges, solution, config.reconstruction.weight_clipping, config.symmetric_weights, config.act_symmetric)
        batches = list(model_inputs(context.batches, config.label_key))
        evaluator = LossEvaluator(context.model, plan, batches, probe.params(), loss=config.lapq.loss, solution=solution,
                                  dequantized_weights=True, memory_budget=config.lapq.memory_budget_mb << 20)
        measured = weight_sensitivities(evaluator, probe, widths, on_probe=lambda done, total: context.notify(Progress("mixed_precision", done, total)))
        costs = np.array([[0.0 if b >= s.bits else measured[s.node][b] for b in widths] for s in sites])
        chosen = allocate(costs, sizes, budget)
        choice = {s.node: widths[k] for s, k in zip(sites, chosen.choice)}
        layer_bits = tuple(LayerBits(node, weight_bits=bits) for node, bits in choice.items())
        record = MixedPrecisionRecord(stage=self.name, widths=choice, sensitivities=measured, budget_bytes=budget, size_bytes=chosen.size,
                                      float_bytes=float_bytes, seconds=time.perf_counter() - started)
        return solution.but(layer_bits=layer_bits), record


def weight_bytes(solution: Solution, site: WeightSite, bits: int, symmetric: bool) -> float:
    """Bytes the export stores for a weight at ``bits``: its codes in their container (4-bit
    types packed two to a byte; 2, 3, 5-7 bits in 8-bit integers), a float32 scale and a zero
    point in the codes' container per channel."""
    weight = solution.weights[site.tensor]
    channels = weight.shape[site.axis] if site.axis is not None else 1
    stored = element_bits(container(QFormat(bits, signed=True, symmetric=symmetric)))
    return -(-weight.size * stored // 8) + channels * SCALE_BYTES + -(-channels * stored // 8)


def _infeasible(options, least: float, float_bytes: float, budget: float) -> str:
    if options.target_size is not None:
        return (f"target_size={options.target_size} is below the smallest model the candidate widths allow "
                f"({least / float_bytes:.4f} of the float weights): give at least {np.ceil(least / float_bytes * 1e4) / 1e4}")
    return (f"target_bits={options.target_bits} is below what the narrowest candidate reaches "
            f"({min(options.candidate_bits)} bits a weight): give at least {min(options.candidate_bits)}")
