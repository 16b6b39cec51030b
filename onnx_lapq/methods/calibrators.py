"""Per-tensor calibrators as a stage: the clipping range of every site from its own statistics.

Activation groups are clipped from their streamed histograms (clip.activation_range:
minmax, percentile, entropy, mse or lp), weights exactly on their values
(clip.weight_range), each site on its own: the 8-bit regime, where the loss landscape
over clipping values is flat and separable.  Biases get the magnitude their int32 grid
must hold, with room for bias correction to move them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import clip
from ..options import CalibrationOptions
from ..params import BIAS_HEADROOM, SiteRanges
from ..plan import QuantPlan
from ..qmath import QFormat
from ..solution import Solution
from ..stats import TensorStats
from .base import RunContext, StageRecord

RANGE = "range"  # the observer kind of min/max and histograms


def activation_observers(plan: QuantPlan) -> dict[str, frozenset[str]]:
    """The statistics a calibrator reads: the range and histogram of every activation site."""
    return {a.tensor: frozenset({RANGE}) for a in plan.activations}


def choose_ranges(
    solution: Solution, plan: QuantPlan, stats, method: str, options: CalibrationOptions, *,
    weight_symmetric: bool, act_symmetric: bool, lp_norm: float | None = None, weight_method: str | None = None,
) -> SiteRanges:
    """Clipping ranges of every activation group and weight by ``method`` (lp at ``lp_norm``,
    default ``options.lp_norm``; weights by ``weight_method`` where given); the weights' values
    come from ``solution``, and a weight on a grid a method fixed (``solution.weight_grids``) keeps it."""
    p = options.lp_norm if lp_norm is None else lp_norm
    acts = {}
    for group in plan.groups:
        members = [stats.range(a.tensor) for a in plan.activations if a.group == group]
        acts[group] = clip.activation_range(
            _merged(members), method, plan.group_bits(group), percentile=options.percentile, p=p, symmetric=act_symmetric,
        )
    weight_ranges = {
        site.tensor: solution.weight_grids.get(site.tensor) or clip.weight_range(
            solution.weight(site.tensor), site.axis, QFormat(site.bits, signed=True, symmetric=weight_symmetric), weight_method or method, p,
            site.block_size,
        )
        for site in plan.weights
    }
    biases = {b.tensor: BIAS_HEADROOM * np.abs(solution.weights[b.tensor]) for b in plan.biases}
    return SiteRanges(activations=acts, weights=weight_ranges, biases=biases)


def _merged(members: list[TensorStats]) -> TensorStats:
    merged = members[0]
    for other in members[1:]:
        merged = merged.merge(other)
    return merged


@dataclass(frozen=True)
class Calibrate:
    """The stage of one calibrator (``method``: one of options.CALIBRATORS)."""

    method: str
    keeps_batches: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.method

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return activation_observers(plan)

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, StageRecord]:
        config = context.config
        ranges = choose_ranges(
            solution, context.plan, context.stats, self.method, config.calibration,
            weight_symmetric=config.symmetric_weights, act_symmetric=config.act_symmetric,
        )
        return solution.but(ranges=ranges), StageRecord(stage=self.name)
