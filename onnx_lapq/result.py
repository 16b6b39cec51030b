"""The result of a run, typed, and the JSON report derived from it.

:class:`QuantResult` holds the quantized model, the plan and parameters that made it, the
Solution, one record per stage, the times, and the fidelity to the float model;
``report`` is the JSON-ready dict written by ``--report``, computed from those fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import onnx

from .config import QuantConfig
from .fidelity import Fidelity
from .graph import default_opset
from .largemodel import model_size
from .methods import StageRecord
from .params import QParams
from .plan import QuantPlan
from .solution import Solution


@dataclass(frozen=True)
class QuantResult:
    """A quantized model and how it was made.

    stages: what each stage did, in order (a search's record has its start and losses).
    start_params: the parameters the last search started from (``params`` when none ran).
    exported_loss: the calibration loss of the exported model, measured with the loss
        evaluator a stage opened (None when no stage evaluated the loss).
    seconds: wall seconds per step (prepare, calibrate, each stage, export, fidelity).
    fidelity: the exported model against the float one on calibration samples (None
        without calibration data)."""

    model: onnx.ModelProto
    plan: QuantPlan
    params: dict[str, QParams]
    solution: Solution
    stages: tuple[StageRecord, ...]
    config: QuantConfig
    original: onnx.ModelProto
    start_params: dict[str, QParams]
    calibration_samples: int
    seconds: dict[str, float]
    float_type: str
    exported_loss: float | None = None
    fidelity: Fidelity | None = None

    @cached_property
    def report(self) -> dict[str, Any]:
        """The run as JSON-ready data: config, opset, sites, sizes, times, each site's range
        and scale (with the scale the last search started from), each stage's entries, the
        exported model's loss and the fidelity."""
        params, initial, plan = self.params, self.start_params, self.plan
        report = {
            "config": _json_ready(asdict(self.config)),
            "opset": default_opset(self.model),
            "calibration_samples": self.calibration_samples,
            "sites": plan.summary(),
            "size_bytes": {"float": model_size(self.original), "quantized": model_size(self.model)},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "activations": [
                {
                    "tensor": a.tensor, "group": a.group, "role": a.role, "bits": a.bits,
                    "range": [float(x) for x in self.solution.ranges.activations[a.group]],
                    "scale": float(params[a.tensor].scale), "zero_point": int(params[a.tensor].zero_point),
                    "initial_scale": float(initial[a.tensor].scale),
                    "signed": params[a.tensor].fmt.signed,
                }
                for a in plan.activations
            ],
            "weights": [
                {
                    "tensor": w.tensor, "node": w.node, "op_type": w.op_type, "bits": w.bits, "axis": w.axis,
                    "scale_min": float(np.min(params[w.tensor].scale)), "scale_max": float(np.max(params[w.tensor].scale)),
                    "initial_scale_min": float(np.min(initial[w.tensor].scale)), "initial_scale_max": float(np.max(initial[w.tensor].scale)),
                    "scale_factor": float(np.mean(params[w.tensor].scale / initial[w.tensor].scale)),
                }
                for w in plan.weights
            ],
        }
        for record in self.stages:
            report.update(record.report())
        if self.exported_loss is not None:
            report["exported_loss"] = self.exported_loss
        report["float_type"] = self.float_type
        if self.fidelity is not None:
            report["fidelity"] = self.fidelity.as_report()
        return report


def _json_ready(value):
    """Tuples as lists, at any depth (asdict keeps them tuples)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_json_ready(v) for v in value]
    return value
