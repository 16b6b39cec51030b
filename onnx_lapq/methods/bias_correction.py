"""Bias correction as a stage: the per-channel input means that correct each layer's bias.

The stage observes the mean of each input channel of every Conv/Gemm with a quantized
bias and puts them in the Solution; the corrected bias itself (biascorr.py) is computed
wherever the Solution's values are taken, from the weights' grid of the moment, so that a
later stage that moves weight scales (LAPQ) keeps it exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..plan import QuantPlan
from ..solution import Solution
from .base import RunContext, StageRecord

CHANNEL_MEAN = "channel_mean"  # the observer kind of per-channel means


@dataclass(frozen=True)
class BiasCorrection:
    """Correct Conv/Gemm biases for the mean output shift of weight quantization (Nagel et al. 2019)."""

    name: ClassVar[str] = "bias_correction"
    keeps_batches: ClassVar[bool] = False

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return {b.input_tensor: frozenset({CHANNEL_MEAN}) for b in plan.biases}

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, StageRecord]:
        means = {b.input_tensor: context.stats.channel_mean(b.input_tensor) for b in context.plan.biases}
        return solution.but(input_means=means), StageRecord(stage=self.name)
