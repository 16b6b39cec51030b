"""quantize(): prepare -> plan -> observe -> stages -> export -> verify, with no file I/O.

    result = quantize(model, calibration, config=QuantConfig(...), on_step=callback)
    result.model   # integer-ready QDQ onnx.ModelProto (checked with onnx.checker and ONNX Runtime)
    result.report  # JSON-ready dict: sites, bits, ranges and scales per site, sizes, times

The methods are stages (methods/): the pipeline observes what they declare in one pass,
runs them in order over a Solution, and exports the Solution they leave.  Weight-only
quantization gathers no statistics: its calibration may be None (the exported model's
numeric check then runs on one synthetic sample).  Every ONNX Runtime session of the run
loads ``config.custom_op_libraries``.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import onnx

from .config import QuantConfig
from .bits import layer_bits
from .data import input_specs, iter_batches, model_inputs, padding_mask, synthetic_sample
from .errors import CalibrationError, ConfigError, ModelError
from .export import export_qdq
from .fidelity import head, keep_head, warn_if_poor
from .fidelity import measure as measure_fidelity
from .graph import INT4_OPSET, MIN_OPSET, default_opset, normalize
from .journal import SearchJournal, check_journal, run_binding
from .methods import RunContext, stages
from .observe import Observations, observe
from .plan import QuantPlan, build_plan
from .precision import to_float32
from .progress import Progress
from .result import QuantResult
from .runtime import custom_ops, require_custom_ops
from .solution import Solution
from .verify import check_exported


def quantize(
    model: onnx.ModelProto,
    calibration: Any,
    *,
    config: QuantConfig = QuantConfig(),
    on_step: Callable[[Progress], None] | None = None,
    journal: SearchJournal | None = None,
) -> QuantResult:
    """Quantize a float ModelProto with the given calibration data (see data.py for its forms;
    None for weight-only quantization).

    ``journal``: the loss evaluations of a searching method are recorded in it, and those
    it already holds, from an interrupted run of the same inputs, are replayed instead of
    measured (see journal.py): the run resumes and ends as if never stopped."""
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"quantize takes an onnx.ModelProto, not {type(model).__name__}: load the file with onnx.load first")
    if not isinstance(config, QuantConfig):
        raise ConfigError("config must be an onnx_lapq.QuantConfig")
    if on_step is not None and not callable(on_step):
        raise ConfigError(f"on_step must be a function of one Progress (or None), not {type(on_step).__name__}")
    if calibration is None and not config.weight_only:
        raise CalibrationError("no calibration data (None): give calibration batches; only weight_only quantization runs without them")
    if calibration is None and config.sparsity.pattern and config.sparsity.repair:
        raise CalibrationError("sparsity repair re-fits the kept weights to calibration data: give calibration batches, or turn repair off")
    if calibration is None and config.weight_rounding != "nearest":
        raise CalibrationError(f"weights={config.weight_rounding!r} reconstructs the weights from calibration data: give calibration batches, or use weights='nearest'")
    check_journal(journal, config)
    notify = on_step or (lambda progress: None)
    with custom_ops(config.custom_op_libraries):
        return _quantize(model, calibration, config, notify, journal)


def _quantize(model: onnx.ModelProto, calibration: Any, config: QuantConfig, notify: Callable[[Progress], None],
              journal: SearchJournal | None) -> QuantResult:
    times: dict[str, float] = {}
    with _timed(times, "prepare"):
        widened, interface = to_float32(model)  # float16/bfloat16 models are quantized in float32
        normalized = normalize(widened, min_opset=INT4_OPSET if config.needs_opset21 else MIN_OPSET, linear_as=_linear_form(config))
        plan = build_plan(normalized, config)
        config = config.for_layers({site.op_type for site in plan.weights})
        require_custom_ops(normalized)
        run = stages(config)
    with _timed(times, "calibrate"):
        batches, kept, stats = _calibrate(model, normalized, interface, calibration, plan, run, config, notify, journal)

    solution = Solution.of(normalized, plan)
    records = []
    with ExitStack() as cleanup:  # an evaluator a stage opened is released however the stages or the export end
        context = RunContext(normalized, plan, config, stats, batches, notify, journal, cleanup)
        for position, stage in enumerate(run):
            with _timed(times, stage.name):
                solution, record = stage.run(context, solution)
                records.append(record)
                if solution.layer_bits is not None:
                    _replan(context, stage.name, solution, run[position + 1:])
        plan, params, evaluator = context.plan, context.params(solution.ranges), context.evaluator
        with _timed(times, "export"):
            notify(Progress("export", 0, None))
            quantized = interface.restore(export_qdq(normalized, plan, params, solution))
            exported = interface.session(check_exported(quantized, interface.restore(normalized), interface.narrow(kept[0])))
            exported_loss = None if evaluator is None else evaluator.measure(exported)
    with _timed(times, "fidelity"):
        measured = [] if calibration is None else kept  # a synthetic sample says nothing of fidelity
        if measured:
            notify(Progress("fidelity", 0, None))
        fidelity = measure_fidelity(normalized, exported, measured, evaluator.kind if evaluator is not None else "auto")
    samples = 0 if stats is None else stats.samples
    warn_if_poor(fidelity, context.config, samples)
    started = next((r.start_ranges for r in reversed(records) if r.start_ranges is not None), None)
    return QuantResult(
        model=quantized, plan=plan, params=params, solution=solution, stages=tuple(records), config=context.config, original=model,
        start_params=params if started is None else context.params(started), calibration_samples=samples, seconds=times,
        float_type=interface.float_type, exported_loss=exported_loss, fidelity=fidelity,
    )


@contextmanager
def _timed(times: dict[str, float], step: str):
    """Adds the wall seconds of the block to ``times[step]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        times[step] = times.get(step, 0.0) + time.perf_counter() - started


def _calibrate(model, normalized, interface, calibration, plan, run, config: QuantConfig, notify, journal):
    """The calibration batches (a list when a stage keeps them, else None), the first samples
    (for the exported model's check and the fidelity) and the statistics the stages need,
    observed in one pass (None for weight-only quantization, which observes nothing: without
    calibration data its check runs on one synthetic sample; a weight-only stage that keeps
    the batches, reconstruction, reads them itself)."""
    batches = None if calibration is None else interface.widen(iter_batches(
        calibration, interface.specs(input_specs(normalized)), batch_size=config.batch_size, num_samples=config.num_samples,
        label_key=config.label_key,
    ))
    keeps = any(stage.keeps_batches for stage in run)
    if config.weight_only:
        if calibration is None:
            return None, [synthetic_sample(normalized, padding_mask(normalized, config.mask_input), config.seed)], None
        batches = list(batches) if keeps else batches  # a weight-only stage that keeps them (reconstruction) reads them
        return (batches if keeps else None), head(model_inputs(batches, config.label_key)), None
    if keeps:  # evaluated many times: kept in memory
        batches = list(batches)
        if journal is not None:
            journal.bind(run_binding(model, batches, config))
    kept: list[dict[str, np.ndarray]] = []
    stats = _observe(normalized, _requests(run, plan, config), keep_head(model_inputs(batches, config.label_key), kept), config, notify)
    return (batches if isinstance(batches, list) else None), kept, stats


def _requests(run, plan: QuantPlan, config: QuantConfig) -> dict[str, set[str]]:
    """tensor -> the observer kinds that the stages of ``run`` need on ``plan``."""
    requests: dict[str, set[str]] = {}
    for stage in run:
        for tensor, kinds in stage.observers(plan, config).items():
            requests.setdefault(tensor, set()).update(kinds)
    return requests


def _observe(normalized: onnx.ModelProto, requests, batches, config: QuantConfig, notify) -> Observations:
    """One streaming pass of ``normalized`` over ``batches`` for ``requests``."""
    return observe(
        normalized, requests, batches, half_bins=config.calibration.histogram_bins // 2,
        mask_input=padding_mask(normalized, config.mask_input), on_batch=lambda done: notify(Progress("calibrate", done, config.num_samples)),
    )


def _replan(context: RunContext, stage: str, solution: Solution, later) -> None:
    """The run's plan made again at the widths ``stage`` chose (``solution.layer_bits``, entry
    by entry over the config's), with what the ``later`` stages need of it observed: the new
    plan's sites that were not observed before (a layer that now runs at 8/8 bits gets an
    output site) take one more pass over the calibration batches, which a stage that chooses
    widths keeps.  Widths come before ranges: ranges chosen on the old plan would not fit."""
    chosen = {entry.node: entry for entry in layer_bits(solution.layer_bits)}
    config = replace(context.config, layer_bits=tuple(e for e in context.config.layer_bits if e.node not in chosen) + tuple(chosen.values()))
    if config.layer_bits == context.config.layer_bits:
        return
    if solution.ranges is not None:
        raise ConfigError(f"stage {stage!r} chose bit-widths after ranges were chosen for the old ones: run it before the clipping stage")
    if config.needs_opset21 and default_opset(context.model) < INT4_OPSET:
        raise ConfigError("the widths a method chose need 4- or 16-bit types (opset 21): include such a width in weight_bits, act_bits or layer_bits")
    plan = build_plan(context.model, config)
    missing = {t: {k for k in kinds if not context.stats.requested(t, k)} for t, kinds in _requests(later, plan, config).items()}
    missing = {t: kinds for t, kinds in missing.items() if kinds}
    if missing:
        if context.batches is None:
            raise ConfigError("a stage that chooses bit-widths must keep the calibration batches (keeps_batches) to observe the new sites")
        batches = model_inputs(context.batches, config.label_key)
        context.stats = context.stats.merged(_observe(context.model, missing, batches, config, context.notify))
    context.plan, context.config = plan, config


def _linear_form(config: QuantConfig) -> str | None:
    """How normalization writes linear layers: as one Gemm (which ONNX Runtime runs as
    QGemm), as MatMul + Add for weight-only quantization (MatMulNBits), or as the model has
    them where an op-type exclusion names either, so that it means the model's own nodes."""
    if {"MatMul", "Gemm"} & set(config.exclude_op_types):
        return None
    return "MatMul" if config.weight_only else "Gemm"
