"""What the methods decide over a plan: the numbers that the export and the loss evaluator take.

A :class:`Solution` holds the float values of every weight and bias site (read once from
the model), the clipping ranges, and what later methods change: weight masks (False: the
weight is pruned to exactly 0), bias correction (the per-channel means of the inputs of
the layers whose biases are corrected, see biascorr.py), the bit-widths of layers (a
stage that sets them makes the pipeline plan the model again at those widths) and the grids
of weights that a method already rounded onto (``weight_grids``: their clipping range, which
later stages keep, so that the stored weights are their codes exactly).  Methods run as stages, each
taking a Solution and returning a new one; a Solution is never changed in place.

The values a QDQ model stores for a site are :meth:`Solution.values`: masked weights, and
biases corrected for the mean output shift of their layer's quantized weights, which moves
with the weights' grid, so it is computed from the parameters of the moment.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .biascorr import corrected_bias
from .bits import LayerBits
from .params import QParams, SiteRanges
from .plan import QuantPlan


@dataclass(frozen=True)
class Solution:
    """Float values of the plan's weight and bias sites, and what the methods chose for them."""

    weights: Mapping[str, np.ndarray]
    ranges: SiteRanges | None = None
    input_means: Mapping[str, np.ndarray] | None = None  # layer input -> per-channel mean; None: biases as they are
    masks: Mapping[str, np.ndarray] = field(default_factory=dict)  # weight tensor -> kept (True) or pruned (False)
    layer_bits: tuple[LayerBits, ...] | None = None  # widths chosen per layer, over the config's; None: the config's
    weight_grids: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # weight -> the range a method rounded it on

    @classmethod
    def of(cls, model: onnx.ModelProto, plan: QuantPlan) -> "Solution":
        """The float values of ``plan``'s weight and bias sites in ``model``, with nothing chosen yet."""
        wanted = {w.tensor for w in plan.weights} | {b.tensor for b in plan.biases}
        return cls(weights={t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted})

    def but(self, **changes) -> "Solution":
        """A new Solution with ``changes`` (field=value) made."""
        return replace(self, **changes)

    def weight(self, tensor: str) -> np.ndarray:
        """A weight's float values with its mask applied."""
        mask = self.masks.get(tensor)
        values = self.weights[tensor]
        return values if mask is None else np.where(mask, values, np.zeros_like(values))

    def values(self, plan: QuantPlan, params: Mapping[str, QParams], sites: set[str] | None = None) -> dict[str, np.ndarray]:
        """The float values to quantize of every weight and bias site (or of ``sites``): weights
        masked, biases corrected where the solution holds their layer's input mean."""
        out = {w.tensor: self.weight(w.tensor) for w in plan.weights if sites is None or w.tensor in sites}
        means = self.input_means or {}
        for bias in plan.biases:
            if sites is not None and bias.tensor not in sites:
                continue
            mean = means.get(bias.input_tensor)
            out[bias.tensor] = self.weights[bias.tensor] if mean is None else corrected_bias(
                bias, self.weights[bias.tensor], self.weight(bias.weight_tensor), params[bias.weight_tensor], mean,
            )
        return out
