"""Measured sensitivity of each layer's weights to a narrower grid, through ONNX Runtime.

For every weight site of a plan and every candidate width below the plan's own, the increase
of the calibration loss when only that weight is on the narrower grid (its range chosen anew
for that width), every other site as the plan has it:

    ΔL(l, b) = loss(params with weight l at b bits) − loss(params of the plan)

One loss evaluator serves every probe: it takes all weights dequantized, as float graph
inputs (``LossEvaluator(dequantized_weights=True)``), so a weight's width is a change of the
values fed, and each probe runs only the graph after the cut before the probed layer.  Probes
go from the last layer to the first, so that restoring one layer's weight never reruns more
than the next probe runs anyway.  :func:`pair_interactions` measures ΔL({l, m}) − ΔL(l) − ΔL(m)
for chosen pairs of (layer, width).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import clip
from .evaluator import LossEvaluator
from .params import QParams, SiteRanges, qparams
from .plan import QuantPlan, WeightSite
from .qmath import QFormat
from .solution import Solution


@dataclass
class WeightProbe:
    """Parameters of a plan with one or more of its weights on other widths, for one evaluator."""

    plan: QuantPlan
    ranges: SiteRanges
    solution: Solution
    weight_method: str
    weight_symmetric: bool
    act_symmetric: bool
    p: float = 2.4

    def params(self, widths: dict[str, int] | None = None) -> dict[str, QParams]:
        """QParams of every site, the weights named in ``widths`` (tensor -> bits) on those
        widths with ranges chosen for them."""
        widths = widths or {}
        sites = tuple(replace(s, bits=widths.get(s.tensor, s.bits)) for s in self.plan.weights)
        ranges = self.ranges
        if widths:
            chosen = {s.tensor: self._range(s) for s in sites if s.tensor in widths}
            ranges = replace(ranges, weights={**ranges.weights, **chosen})
        return qparams(replace(self.plan, weights=sites), ranges, weight_symmetric=self.weight_symmetric, act_symmetric=self.act_symmetric)

    def _range(self, site: WeightSite) -> tuple[np.ndarray, np.ndarray]:
        fmt = QFormat(site.bits, signed=True, symmetric=self.weight_symmetric)
        return clip.weight_range(self.solution.weight(site.tensor), site.axis, fmt, self.weight_method, self.p, site.block_size)


def weight_sensitivities(evaluator: LossEvaluator, probe: WeightProbe, widths: tuple[int, ...], on_probe=None) -> dict[str, dict[int, float]]:
    """node -> {bits: ΔL} for every weight site of ``probe.plan`` and every width of ``widths``
    below its own (see the module docstring); ``evaluator`` was built with
    ``dequantized_weights=True`` on the same plan.  ``on_probe(done, total)`` is told each probe."""
    if not evaluator.dequantized_weights:
        raise ValueError("sensitivity probes need an evaluator with dequantized_weights=True")
    base = probe.params()
    baseline = evaluator(base)
    order = {tensor: i for i, tensor in enumerate(probe.plan.reads)}
    sites = sorted(probe.plan.weights, key=lambda s: order.get(s.tensor, 0), reverse=True)
    todo = [(s, b) for s in sites for b in sorted(widths) if b < s.bits]
    out: dict[str, dict[int, float]] = {s.node: {} for s in sites}
    for done, (site, bits) in enumerate(todo, 1):
        out[site.node][bits] = evaluator(probe.params({site.tensor: bits})) - baseline
        if on_probe is not None:
            on_probe(done, len(todo))
    evaluator(base)
    return out


def pair_interactions(evaluator: LossEvaluator, probe: WeightProbe, pairs: list[tuple[tuple[str, int], tuple[str, int]]],
                      single: dict[str, dict[int, float]]) -> dict[tuple[tuple[str, int], tuple[str, int]], float]:
    """ΔL({l, m}) − ΔL(l) − ΔL(m) for each pair ((node, bits), (node, bits)), from the single
    probes ``single`` (:func:`weight_sensitivities`)."""
    tensor = {s.node: s.tensor for s in probe.plan.weights}
    base = probe.params()
    baseline = evaluator(base)
    out = {}
    for (a, bits_a), (b, bits_b) in pairs:
        joint = evaluator(probe.params({tensor[a]: bits_a, tensor[b]: bits_b})) - baseline
        out[((a, bits_a), (b, bits_b))] = joint - single[a][bits_a] - single[b][bits_b]
    evaluator(base)
    return out
