"""quantize(): prepare -> plan -> calibrate -> clip -> export -> verify, with no file I/O.

    result = quantize(model, calibration, config=QuantConfig(...), on_step=callback)
    result.model   # integer-ready QDQ onnx.ModelProto (checked with onnx.checker and ONNX Runtime)
    result.report  # JSON-ready dict: sites, bits, ranges and scales per site, sizes, times
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import clip
from .calibrate import collect_stats
from .config import QuantConfig
from .data import input_specs, iter_batches
from .errors import ConfigError, ModelError
from .export import export_qdq
from .graph import INT4_OPSET, MIN_OPSET, default_opset, normalize
from .params import QParams, SiteRanges, qparams
from .plan import QuantPlan, build_plan
from .qmath import QFormat
from .stats import TensorStats
from .verify import check_exported


@dataclass(frozen=True)
class Progress:
    """What ``on_step`` receives: a stage name, work done, and the total when known."""

    stage: str
    done: int
    total: int | None


@dataclass(frozen=True)
class QuantResult:
    """A quantized model with the plan and parameters that made it, and a report."""

    model: onnx.ModelProto
    plan: QuantPlan
    params: dict[str, QParams]
    report: dict[str, Any]


def quantize(
    model: onnx.ModelProto,
    calibration: Any,
    *,
    config: QuantConfig = QuantConfig(),
    on_step: Callable[[Progress], None] | None = None,
) -> QuantResult:
    """Quantize a float ModelProto with the given calibration data (see data.py for its forms)."""
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"quantize takes an onnx.ModelProto, not {type(model).__name__}: load the file with onnx.load first")
    if not isinstance(config, QuantConfig):
        raise ConfigError("config must be an onnx_lapq.QuantConfig")
    notify = on_step or (lambda progress: None)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    normalized = normalize(model, min_opset=INT4_OPSET if config.needs_opset21 else MIN_OPSET)
    plan = build_plan(normalized, config)
    times["prepare"] = time.perf_counter() - clock

    clock = time.perf_counter()
    batches = iter_batches(calibration, input_specs(normalized), batch_size=config.batch_size, num_samples=config.num_samples)
    tensors = [a.tensor for a in plan.activations]
    stats, samples = collect_stats(
        normalized, tensors, batches, half_bins=config.histogram_bins // 2,
        on_batch=lambda done: notify(Progress("calibrate", done, config.num_samples)),
    )
    times["calibrate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ranges = choose_ranges(normalized, plan, stats, config)
    params = qparams(plan, ranges, weight_symmetric=config.weight_symmetric, act_symmetric=config.act_symmetric)
    times["clip"] = time.perf_counter() - clock

    clock = time.perf_counter()
    quantized = export_qdq(normalized, plan, params)
    check_exported(quantized)
    times["export"] = time.perf_counter() - clock

    report = _report(model, quantized, plan, params, ranges, config, times, samples)
    return QuantResult(model=quantized, plan=plan, params=params, report=report)


def choose_ranges(model: onnx.ModelProto, plan: QuantPlan, stats: dict[str, TensorStats], config: QuantConfig) -> SiteRanges:
    """Clipping ranges of every activation group and weight, by ``config.method``."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    acts = {}
    for group in plan.groups:
        members = [stats[a.tensor] for a in plan.activations if a.group == group]
        merged = members[0] if len(members) == 1 else _merge(members)
        acts[group] = clip.activation_range(
            merged, config.method, plan.group_bits(group), percentile=config.percentile, p=config.lp_norm, symmetric=config.act_symmetric,
        )
    weight_ranges = {
        site.tensor: clip.weight_range(
            weights[site.tensor], site.axis, QFormat(site.bits, signed=True, symmetric=config.weight_symmetric), config.method, config.lp_norm,
        )
        for site in plan.weights
    }
    return SiteRanges(activations=acts, weights=weight_ranges)


def _merge(members: list[TensorStats]) -> TensorStats:
    merged = members[0]
    for other in members[1:]:
        merged = merged.merge(other)
    return merged


def _report(original, quantized, plan, params, ranges, config, times, samples) -> dict[str, Any]:
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "opset": default_opset(quantized),
        "calibration_samples": samples,
        "sites": plan.summary(),
        "size_bytes": {"float": original.ByteSize(), "quantized": quantized.ByteSize()},
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "activations": [
            {
                "tensor": a.tensor, "group": a.group, "role": a.role, "bits": a.bits,
                "range": [float(x) for x in ranges.activations[a.group]],
                "scale": float(params[a.tensor].scale), "zero_point": int(params[a.tensor].zero_point),
                "signed": params[a.tensor].fmt.signed,
            }
            for a in plan.activations
        ],
        "weights": [
            {
                "tensor": w.tensor, "node": w.node, "op_type": w.op_type, "bits": w.bits, "axis": w.axis,
                "scale_min": float(np.min(params[w.tensor].scale)), "scale_max": float(np.max(params[w.tensor].scale)),
            }
            for w in plan.weights
        ],
    }
