"""Measured sensitivity of each layer's weights (and each activation) to a narrower grid, through ONNX Runtime.

For every weight site of a plan and every candidate width below the plan's own, the increase
of the calibration loss when only that weight is on the narrower grid (its range chosen anew
for that width), every other site as the plan has it:

    ΔL(l, b) = loss(params with weight l at b bits) − loss(params of the plan)

and likewise for every activation group (:func:`activation_sensitivities`).  One loss
evaluator per worker serves its probes: it takes all weights dequantized, as float graph
inputs, and every activation behind a Clip in an 8-bit container
(``LossEvaluator(any_widths=True)``), so a width is a change of the values fed, and each
probe runs only the graph after the cut before the probed layer, the same numbers from any
cut.  Probes are independent: an executor (executor.py) runs them in
this process, in local worker processes or on Ray, handing them out from the last layer to
the first, so that restoring one layer's weight never reruns more than the next probe runs
anyway.  :func:`pair_interactions` measures ΔL({l, m}) − ΔL(l) − ΔL(m) for chosen pairs of
(layer, width).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import clip
from .evaluator import LossEvaluator
from .executor import run_jobs
from .params import QParams, SiteRanges, qparams
from .plan import QuantPlan, WeightSite
from .qmath import QFormat
from .solution import Solution


@dataclass
class WidthProbe:
    """Parameters of a plan with some of its weights or activation groups on other widths, for one evaluator."""

    plan: QuantPlan
    ranges: SiteRanges
    solution: Solution
    weight_method: str
    weight_symmetric: bool
    act_symmetric: bool
    p: float = 2.4
    act_ranges: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # bits -> group -> its range chosen at those bits

    def params(self, widths: dict[str, int] | None = None) -> dict[str, QParams]:
        """QParams of every site, the weights and activation groups named in ``widths``
        (weight tensor or group -> bits) on those widths, with ranges chosen for them."""
        widths = widths or {}
        sites = tuple(replace(s, bits=widths.get(s.tensor, s.bits)) for s in self.plan.weights)
        acts = tuple(replace(a, bits=widths[a.group]) if a.group in widths else a for a in self.plan.activations)
        ranges = self.ranges
        if widths:
            chosen = {s.tensor: self._range(s) for s in sites if s.tensor in widths}
            groups = {g: self.act_ranges[b][g] for g, b in widths.items() if g in self.act_ranges.get(b, {})}
            ranges = replace(ranges, weights={**ranges.weights, **chosen}, activations={**ranges.activations, **groups})
        plan = replace(self.plan, weights=sites, activations=acts)
        return qparams(plan, ranges, weight_symmetric=self.weight_symmetric, act_symmetric=self.act_symmetric)

    def _range(self, site: WeightSite) -> tuple[np.ndarray, np.ndarray]:
        fmt = QFormat(site.bits, signed=True, symmetric=self.weight_symmetric)
        return clip.weight_range(self.solution.weight(site.tensor), site.axis, fmt, self.weight_method, self.p, site.block_size)


@dataclass(frozen=True)
class ProbeJob:
    """What a worker needs to measure probes: the float model, the probe's parameters, the
    calibration batches (model inputs only), the loss and the evaluator's memory budget."""

    model: onnx.ModelProto
    probe: WidthProbe
    batches: list[dict[str, np.ndarray]]
    loss: str
    memory_budget: int
    replaced: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (tensor, bits) -> the weight a probe evaluates there

    def open(self) -> "ProbeSession":
        """A worker's state: an evaluator with every weight dequantized, and its loss at the plan's widths."""
        evaluator = LossEvaluator(self.model, self.probe.plan, self.batches, self.probe.params(), loss=self.loss,
                                  solution=self.probe.solution, any_widths=True, memory_budget=self.memory_budget)
        return ProbeSession(evaluator, self.probe, self.replaced, evaluator(self.probe.params()))


@dataclass
class ProbeSession:
    """An open probe evaluator: ``increase(widths)`` is the loss at ``widths`` (tensor -> bits
    over the plan's; bits 0: the plan's own) with each weight the one ``replaced`` holds for
    (tensor, bits), if any, minus the loss at the plan's widths and weights."""

    evaluator: LossEvaluator
    probe: WidthProbe
    replaced: dict[tuple[str, int], np.ndarray]
    baseline: float
    _swapped: frozenset[str] = frozenset()  # the tensors whose weight the evaluator holds replaced

    def increase(self, widths: Widths) -> float:
        weights = {tensor: self.replaced[(tensor, bits)] for tensor, bits in widths if (tensor, bits) in self.replaced}
        if weights or self._swapped:
            base = self.probe.solution
            self.evaluator.use(base.but(weights={**base.weights, **weights}), tensors=self._swapped | set(weights))
            self._swapped = frozenset(weights)
        return self.evaluator(self.probe.params({tensor: bits for tensor, bits in widths if bits})) - self.baseline


Widths = tuple[tuple[str, int], ...]  # (weight tensor or activation group, bits) of what a probe narrows


def loss_increases(job: ProbeJob, probes: list[Widths], executor: str = "inline", on_probe=None) -> list[float]:
    """The loss increase of each probe, measured by ``executor`` (executor.py); the same
    numbers whichever executor ran them.  ``on_probe(done, total)`` is told as probes finish."""
    return run_jobs(executor, ProbeJob.open, ProbeSession.increase, job, probes, on_probe)


def probe_order(plan: QuantPlan) -> list[WeightSite]:
    """The plan's weight sites from the last layer to the first: probes in this order rerun the least graph."""
    order = {tensor: i for i, tensor in enumerate(plan.reads)}
    return sorted(plan.weights, key=lambda s: order.get(s.tensor, 0), reverse=True)


def weight_sensitivities(job: ProbeJob, widths: tuple[int, ...], executor: str = "inline", on_probe=None) -> dict[str, dict[int, float]]:
    """node -> {bits: ΔL} for every weight site of the job's plan and every width of ``widths``
    below its own (see the module docstring)."""
    todo = [(s, b) for s in probe_order(job.probe.plan) for b in sorted(widths) if b < s.bits]
    measured = loss_increases(job, [((s.tensor, b),) for s, b in todo], executor, on_probe)
    out: dict[str, dict[int, float]] = {s.node: {} for s in job.probe.plan.weights}
    for (site, bits), value in zip(todo, measured):
        out[site.node][bits] = value
    return out


def activation_sensitivities(job: ProbeJob, groups: set[str], widths: tuple[int, ...], executor: str = "inline",
                             on_probe=None) -> dict[str, dict[int, float]]:
    """group -> {bits: ΔL} for each of ``groups`` (activation groups of the job's plan) and
    every width of ``widths`` below its own: the loss increase with only that group's sites on
    the narrower grid (its range chosen for that width, ``WidthProbe.act_ranges``)."""
    plan = job.probe.plan
    order = {tensor: i for i, tensor in enumerate(plan.reads)}
    ordered = sorted(groups, key=lambda g: order.get(g, 0), reverse=True)  # the last first, as probe_order
    todo = [(g, b) for g in ordered for b in sorted(widths) if b < plan.group_bits(g)]
    measured = loss_increases(job, [((g, b),) for g, b in todo], executor, on_probe)
    out: dict[str, dict[int, float]] = {g: {} for g in ordered}
    for (group, bits), value in zip(todo, measured):
        out[group][bits] = value
    return out


def pair_interactions(job: ProbeJob, pairs: list[tuple[tuple[str, int], tuple[str, int]]], single: dict[str, dict[int, float]],
                      executor: str = "inline", on_probe=None) -> dict[tuple[tuple[str, int], tuple[str, int]], float]:
    """ΔL({l, m}) − ΔL(l) − ΔL(m) for each pair ((node, bits), (node, bits)), from the single
    probes ``single`` (:func:`weight_sensitivities`)."""
    tensor = {s.node: s.tensor for s in job.probe.plan.weights}
    joint = loss_increases(job, [((tensor[a], bits_a), (tensor[b], bits_b)) for (a, bits_a), (b, bits_b) in pairs], executor, on_probe)
    return {pair: value - single[pair[0][0]][pair[0][1]] - single[pair[1][0]][pair[1][1]] for pair, value in zip(pairs, joint)}
