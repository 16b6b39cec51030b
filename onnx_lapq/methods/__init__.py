"""Quantization methods as stages over a Solution, and the stages a config asks for.

Each method is a module here: the per-tensor calibrators (calibrators.py), bias correction
(bias_correction.py), weight reconstruction (reconstruction.py), N:M sparsity (sparsify.py),
mixed precision (mixed.py) and LAPQ (lapq.py).  A run is an ordered list of stages; each
declares the statistics it needs and maps the Solution so far to a new one (base.py).

    stages(config)  # method="lapq" with bias correction: [BiasCorrection(), Lapq()]
"""
from __future__ import annotations

from ..config import QuantConfig
from .base import RunContext, Stage, StageRecord
from .bias_correction import BiasCorrection
from ..options import CALIBRATORS
from .calibrators import Calibrate
from .lapq import Lapq
from .mixed import MixedPrecision
from .reconstruction import Reconstruct
from .sparsify import Sparsify

CLIPPING = {**{name: Calibrate(name) for name in CALIBRATORS}, "lapq": Lapq()}  # config.method -> the stage that clips


def stages(config: QuantConfig) -> list[Stage]:
    """The stages of a run of ``config``, in order: N:M pruning where the config asks for it
    (every later stage works on the pruned weights), the layers' widths under a budget
    where mixed precision is on (the plan is made again at them), bias correction where it is on (a
    later stage may evaluate with it, and LAPQ may switch it off), then the weights'
    reconstruction where the config's rounding is one, then the clipping method."""
    sparsity = [Sparsify(config.sparsity.repair)] if config.sparsity.pattern else []
    widths = [MixedPrecision()] if config.mixed_precision.allocates else []
    correction = [BiasCorrection()] if config.bias_correction and not config.weight_only else []
    reconstruction = [] if config.weight_rounding == "nearest" else [Reconstruct(config.weight_rounding)]
    return [*sparsity, *widths, *correction, *reconstruction, CLIPPING[config.method]]


__all__ = ["RunContext", "Stage", "StageRecord", "stages"]
