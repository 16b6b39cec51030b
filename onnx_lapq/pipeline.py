"""quantize(): prepare -> plan -> calibrate -> clip -> export -> verify, with no file I/O.

    result = quantize(model, calibration, config=QuantConfig(...), on_step=callback)
    result.model   # integer-ready QDQ onnx.ModelProto (checked with onnx.checker and ONNX Runtime)
    result.report  # JSON-ready dict: sites, bits, ranges and scales per site, sizes, times

Weight-only quantization gathers no statistics: its calibration may be None (the exported
model's numeric check then runs on one synthetic sample).  Every ONNX Runtime session of
the run loads ``config.custom_op_libraries``.
"""
from __future__ import annotations

import functools
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import clip
from .config import QuantConfig
from .data import input_specs, iter_batches, synthetic_sample
from .errors import CalibrationError, ConfigError, ModelError
from .evaluator import LossEvaluator
from .export import export_qdq
from .fidelity import Fidelity, head, keep_head, warn_if_poor
from .fidelity import measure as measure_fidelity
from .graph import INT4_OPSET, MIN_OPSET, default_opset, normalize
from .journal import JournaledLoss, SearchJournal, check_journal, run_binding
from .lapq import resume, run_lapq
from .largemodel import model_size
from .observe import observe
from .params import BIAS_HEADROOM, ParamSpace, QParams, SiteRanges, qparams
from .plan import QuantPlan, build_plan
from .precision import to_float32
from .qmath import QFormat
from .runtime import custom_ops, release_shared_arena, require_custom_ops
from .stats import TensorStats
from .verify import check_exported


START_CALIBRATORS = ("minmax", "entropy")  # LAPQ start candidates besides the Lp sweep (min/max: the p -> infinity limit)
BIAS_CORRECTION_ESSENTIAL = 2.0


@dataclass(frozen=True)
class Progress:
    """What ``on_step`` receives: a stage name, work done, the total when known, and the
    best loss so far during the search.  The stages: calibrate, start (lapq's evaluator, Lp
    sweep and start candidates), search, export, fidelity; each sends an event as it begins
    or as its work advances."""

    stage: str
    done: int
    total: int | None
    loss: float | None = None


@dataclass(frozen=True)
class QuantResult:
    """A quantized model with the plan and parameters that made it, a report, and its
    fidelity to the float model on calibration samples (None without calibration data)."""

    model: onnx.ModelProto
    plan: QuantPlan
    params: dict[str, QParams]
    report: dict[str, Any]
    fidelity: Fidelity | None = None


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

    ``journal`` (method="lapq" only): the run's loss evaluations are recorded in it, and
    those it already holds, from an interrupted run of the same inputs, are replayed
    instead of measured (see journal.py): the run resumes and ends as if never stopped."""
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"quantize takes an onnx.ModelProto, not {type(model).__name__}: load the file with onnx.load first")
    if not isinstance(config, QuantConfig):
        raise ConfigError("config must be an onnx_lapq.QuantConfig")
    if on_step is not None and not callable(on_step):
        raise ConfigError(f"on_step must be a function of one Progress (or None), not {type(on_step).__name__}")
    if calibration is None and not config.weight_only:
        raise CalibrationError("no calibration data (None): give calibration batches; only weight_only quantization runs without them")
    check_journal(journal, config)
    notify = on_step or (lambda progress: None)
    with custom_ops(config.custom_op_libraries):
        return _quantize(model, calibration, config, notify, journal)


def _quantize(model: onnx.ModelProto, calibration: Any, config: QuantConfig, notify: Callable[[Progress], None],
              journal: SearchJournal | None) -> QuantResult:
    times: dict[str, float] = {}
    clock = time.perf_counter()

    widened, interface = to_float32(model)  # float16/bfloat16 models are quantized in float32
    normalized = normalize(widened, min_opset=INT4_OPSET if config.needs_opset21 else MIN_OPSET, linear_as=_linear_form(config))
    plan = build_plan(normalized, config)
    require_custom_ops(normalized)
    times["prepare"] = time.perf_counter() - clock

    clock = time.perf_counter()
    batches = None if calibration is None else interface.widen(iter_batches(
        calibration, interface.specs(input_specs(normalized)), batch_size=config.batch_size, num_samples=config.num_samples,
        label_key=config.label_key,
    ))
    kept: list[dict[str, np.ndarray]] = []  # the first samples, for the exported model's check and fidelity
    if config.weight_only:  # rounds the weights alone: no statistics to gather
        stats, samples, channel_means = {}, 0, {}
        kept = [synthetic_sample(normalized, padding_mask(normalized, config.mask_input), config.seed)] if calibration is None \
            else head(_without(batches, config.label_key))
    else:
        if config.method == "lapq":  # the search evaluates the loss on the same samples many times
            batches = list(batches)
            if journal is not None:
                journal.bind(run_binding(model, batches, config))
        layer_inputs = [b.input_tensor for b in plan.biases] if config.bias_correction else []  # for their channel means
        requests: dict[str, set[str]] = {}
        for tensor, kind in [(a.tensor, "range") for a in plan.activations] + [(t, "channel_mean") for t in layer_inputs]:
            requests.setdefault(tensor, set()).add(kind)
        observed = observe(
            normalized, requests, keep_head(_without(batches, config.label_key), kept), half_bins=config.histogram_bins // 2,
            mask_input=padding_mask(normalized, config.mask_input), on_batch=lambda done: notify(Progress("calibrate", done, config.num_samples)),
        )
        stats, samples, channel_means = observed.of_kind("range"), observed.samples, observed.of_kind("channel_mean")
    times["calibrate"] = time.perf_counter() - clock

    means = {b.input_tensor: channel_means[b.input_tensor] for b in plan.biases} if config.bias_correction else None
    search_report: dict[str, Any] = {}
    initial_params = None
    evaluator = None
    with ExitStack() as cleanup:  # the search's evaluator is released however the search or the export ends
        clock = time.perf_counter()
        if config.method == "lapq":
            ranges, initial_params, evaluator, search_report, means = _lapq(normalized, plan, stats, batches, config, notify, means, cleanup, journal)
        else:
            ranges = choose_ranges(normalized, plan, stats, config)
        params = _qparams(plan, ranges, config)
        times["search" if config.method == "lapq" else "clip"] = time.perf_counter() - clock

        clock = time.perf_counter()
        notify(Progress("export", 0, None))
        quantized = interface.restore(export_qdq(normalized, plan, params, input_means=means))
        exported = interface.session(check_exported(quantized, interface.restore(normalized), interface.narrow(kept[0])))
        if evaluator is not None:
            search_report["exported_loss"] = evaluator.measure(exported)
    times["export"] = time.perf_counter() - clock
    clock = time.perf_counter()
    measured = [] if calibration is None else kept  # a synthetic sample says nothing of fidelity
    if measured:
        notify(Progress("fidelity", 0, None))
    fidelity = measure_fidelity(normalized, exported, measured, evaluator.kind if evaluator is not None else config.loss)
    times["fidelity"] = time.perf_counter() - clock
    warn_if_poor(fidelity, config, samples)

    report = _report(model, quantized, plan, params, ranges, config, times, samples, initial_params)
    report.update(search_report)
    report["float_type"] = interface.float_type
    if fidelity is not None:
        report["fidelity"] = fidelity.as_report()
    return QuantResult(model=quantized, plan=plan, params=params, report=report, fidelity=fidelity)


def _linear_form(config: QuantConfig) -> str | None:
    """How normalization writes linear layers: as one Gemm (which ONNX Runtime runs as
    QGemm), as MatMul + Add for weight-only quantization (MatMulNBits), or as the model has
    them where an op-type exclusion names either, so that it means the model's own nodes."""
    if {"MatMul", "Gemm"} & set(config.exclude_op_types):
        return None
    return "MatMul" if config.weight_only else "Gemm"


def padding_mask(model: onnx.ModelProto, mask_input: str | None) -> str | None:
    """The graph input that marks padding (see QuantConfig.mask_input), or None."""
    specs = {s.name: s for s in input_specs(model)}
    if mask_input is None:
        return None
    if mask_input != "auto":
        if mask_input not in specs:
            raise ConfigError(f"mask_input {mask_input!r} is not a graph input: choose one of {sorted(specs)}")
        return mask_input
    found = [s.name for s in specs.values() if "mask" in s.name.lower() and len(s.shape) == 2 and s.dtype.kind in "iub"]
    return found[0] if len(found) == 1 else None


def _qparams(plan: QuantPlan, ranges: SiteRanges, config: QuantConfig) -> dict[str, QParams]:
    return qparams(plan, ranges, weight_symmetric=config.weight_symmetric, act_symmetric=config.act_symmetric)


def _without(batches, label_key: str | None):
    """The batches with the labels array (if any) removed: what the model itself takes."""
    for batch in batches:
        yield {k: v for k, v in batch.items() if k != label_key}


def _subset(batches: list[dict[str, np.ndarray]], size: int | None, batch_size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A seeded random subset of ``size`` samples, in order and re-batched (all when None or too few).

    Batches of different shapes (e.g. sequence lengths) are sampled whole."""
    rows = [len(next(iter(b.values()))) for b in batches]
    if size is None or size >= sum(rows):
        return batches
    if len({tuple(v.shape[1:] for v in b.values()) for b in batches}) > 1:
        order = rng.permutation(len(batches))
        keep, count = [], 0
        for i in order:
            if count >= size:
                break
            keep.append(i)
            count += rows[i]
        return [batches[i] for i in sorted(keep)]
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    chosen = np.sort(rng.choice(sum(rows), size, replace=False))
    return [{k: v[chosen[i:i + batch_size]] for k, v in joined.items()} for i in range(0, size, batch_size)]


def _lapq(normalized, plan, stats, batches, config: QuantConfig, notify, input_means, cleanup: ExitStack, journal: SearchJournal | None = None):
    """LAPQ's ranges, the start parameters, the evaluator (released when ``cleanup`` closes),
    the report entries, and the input means if bias correction stays on.  Every loss
    evaluation goes through ``journal`` when there is one.

    Whether bias correction stays on in the search is network-specific: it hurts
    cifar10_resnet20 W4A4 (search loss 0.558 and 69.4% with, 0.450 and 75.4% without, 1000
    evaluations) although it lowers the loss of the start (0.954 against 1.173), and
    mobilenet_v2 W4A4 needs it (2.25 and 28.2% with, 4.90 and 7.9% without, 150
    evaluations).  The losses after some searching tell, the start's do not, so by default
    "race" lets them decide (``_race_bias_correction``), unless correction leaves the loss
    of the min/max start exactly as it is (mobilenet_v2 W8A8): then both sides would search
    alike, and the race would only halve the budget (0.01464 after 150 evaluations
    against 0.01382 without a race).  "auto" keeps it only where it
    cuts the loss of the min/max start by more than BIAS_CORRECTION_ESSENTIAL times (it
    misses mobilenet_v2); "on" and "off" decide for every network."""
    notify(Progress("start", 0, None))
    batches = _subset(batches, config.search_samples, config.batch_size, np.random.default_rng(config.seed))
    labels = np.concatenate([b[config.label_key] for b in batches]) if config.label_key else None
    inputs = list(_without(batches, config.label_key))

    @functools.cache  # each side of the race sweeps the same grid, and a resumed run sweeps it again
    def ranges_at_p(p: float) -> SiteRanges:
        return choose_ranges(normalized, plan, stats, replace(config, method="lp", lp_norm=float(p)))

    if config.search_bias_correction == "off":
        input_means = None
    first = _qparams(plan, ranges_at_p(config.lp_grid[0]), config)
    evaluator = LossEvaluator(
        normalized, plan, inputs, first, loss=config.loss, labels=labels, memory_budget=config.memory_budget_mb << 20,
        input_means=input_means,
    )
    cleanup.callback(_release, evaluator)
    evaluate = evaluator if journal is None else JournaledLoss(evaluator, journal)
    starts = {m: choose_ranges(normalized, plan, stats, replace(config, method=m)) for m in START_CALIBRATORS}
    if input_means and config.search_bias_correction in ("auto", "race"):  # the min/max start with and without
        start = _qparams(plan, starts["minmax"], config)
        corrected = evaluate(start)
        evaluator.set_input_means(None)
        plain = evaluate(start)
        needed = plain > BIAS_CORRECTION_ESSENTIAL * corrected if config.search_bias_correction == "auto" else plain != corrected
        if needed:
            evaluator.set_input_means(input_means)
        else:
            input_means = None

    def loss_of(ranges: SiteRanges) -> float:
        return evaluate(_qparams(plan, ranges, config))

    def space_for(ranges: SiteRanges) -> ParamSpace:
        return ParamSpace(plan, ranges)

    best_shown = [np.inf]  # across the race's two searches and the continuation

    def progress(spent: int):
        def report(n: int, best: float) -> None:
            best_shown[0] = min(best_shown[0], best)
            notify(Progress("search", spent + n, config.max_evals, best_shown[0]))
        return report

    searching = {"search": config.search, "iterations": config.search_iterations, "step": config.search_step}
    race: dict[str, float | bool | int] = {}
    if input_means and config.search_bias_correction == "race" and config.max_evals >= 2:  # a search each way
        outcome, race = _race_bias_correction(
            evaluator, input_means, config,
            lambda max_evals, time_limit, spent: run_lapq(
                ranges_at_p, starts, loss_of, space_for, lp_grid=config.lp_grid, max_evals=max_evals, time_limit=time_limit,
                on_eval=progress(spent), **searching,
            ),
        )
        input_means = input_means if race["kept"] else None
        remaining = config.max_evals - race["evaluations"]
        if remaining > 0 and (config.time_limit is None or race["seconds"] < config.time_limit):
            outcome = resume(
                outcome, loss_of, space_for, max_evals=remaining,
                time_limit=None if config.time_limit is None else config.time_limit - race["seconds"],
                spent=race["evaluations"], on_eval=progress(0), **searching,
            )
    else:
        outcome = run_lapq(
            ranges_at_p, starts, loss_of, space_for, lp_grid=config.lp_grid, max_evals=config.max_evals,
            time_limit=config.time_limit, on_eval=progress(0), **searching,
        )
    report = {
        "loss": evaluator.kind,
        "start": outcome.start,
        "p_star": outcome.p_star,
        "p_losses": {str(p): v for p, v in outcome.p_losses.items()},
        "start_losses": outcome.start_losses,
        "init_loss": outcome.init_loss,
        "final_loss": outcome.search.fun,
        "nfev": outcome.search.nfev,
        "nit": outcome.search.nit,
        "search_message": outcome.search.message,
        "search_seconds": round(outcome.search.seconds, 3),
        "loss_trace": [[n, v] for n, v in outcome.search.trace],
        "evaluator": {
            "mode": "fused" if evaluator.fused else "fed",
            "cuts": len(evaluator.cuts) - 1,
            "mean_suffix_fraction": round(evaluator.mean_suffix_fraction, 3),
            "fp32_pass_seconds": round(evaluator.fp32_seconds, 4),
            "cost_ratio": round(evaluator.cost_ratio, 3),
        },
    }
    report["bias_correction"] = input_means is not None
    if race:
        report["bias_correction_race"] = race
    if journal is not None:
        report["replayed_evaluations"] = evaluate.replayed
    return outcome.ranges, _qparams(plan, outcome.initial_ranges, config), evaluator, report, input_means


def _release(evaluator: LossEvaluator) -> None:
    """Stop the evaluator and give the memory its sessions held in the shared arena back to the system."""
    evaluator.close()
    release_shared_arena()


def _race_bias_correction(evaluator: LossEvaluator, input_means, config: QuantConfig, search):
    """search_bias_correction="race": LAPQ with and without bias correction, each on a
    quarter of the budgets (``search(max_evals, time_limit, spent)``); the evaluator keeps
    the setting whose search ended lower.  Returns the winner's outcome, its nfev, trace
    and seconds those of the whole race (the trace numbered as the evaluations ran), and
    what the race measured: the final loss of each side, whether correction was kept, and
    the evaluations and seconds the race used."""
    started = time.perf_counter()
    quarter = max(1, config.max_evals // 4)
    quarter_time = None if config.time_limit is None else config.time_limit / 4
    outcomes = {}
    for keep in (True, False):
        evaluator.set_input_means(input_means if keep else None)
        outcomes[keep] = search(quarter, quarter_time, sum(o.search.nfev for o in outcomes.values()))
    kept = outcomes[True].search.fun < outcomes[False].search.fun
    evaluator.set_input_means(input_means if kept else None)
    before = 0 if kept else outcomes[True].search.nfev  # the winner's evaluations came after these
    winner = outcomes[kept]
    race = {
        "on": outcomes[True].search.fun, "off": outcomes[False].search.fun, "kept": kept,
        "evaluations": outcomes[True].search.nfev + outcomes[False].search.nfev, "seconds": time.perf_counter() - started,
    }
    counted = replace(  # nfev, trace and seconds of the whole race, as if one search
        winner.search, nfev=race["evaluations"], trace=[(before + n, v) for n, v in winner.search.trace],
        seconds=outcomes[True].search.seconds + outcomes[False].search.seconds,
    )
    return replace(winner, search=counted), race


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
            weights[site.tensor], site.axis, QFormat(site.bits, signed=True, symmetric=config.weight_symmetric), config.method,
            config.lp_norm, site.block_size,
        )
        for site in plan.weights
    }
    biases = {b.tensor: BIAS_HEADROOM * np.abs(weights[b.tensor]) for b in plan.biases}
    return SiteRanges(activations=acts, weights=weight_ranges, biases=biases)


def _merge(members: list[TensorStats]) -> TensorStats:
    merged = members[0]
    for other in members[1:]:
        merged = merged.merge(other)
    return merged


def _report(original, quantized, plan, params, ranges, config, times, samples, initial=None) -> dict[str, Any]:
    initial = initial or params
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "opset": default_opset(quantized),
        "calibration_samples": samples,
        "sites": plan.summary(),
        "size_bytes": {"float": model_size(original), "quantized": model_size(quantized)},
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "activations": [
            {
                "tensor": a.tensor, "group": a.group, "role": a.role, "bits": a.bits,
                "range": [float(x) for x in ranges.activations[a.group]],
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
