"""Layer-wise weight reconstruction as a stage: quantized weights that fit their quantized inputs.

Front to back, each Conv/Gemm/MatMul with a constant weight gets the weight on its integer
grid that minimizes E‖W x − Ŵ x̂‖² over the calibration set (AdaQuant's layer-wise
calibration; x its input in the float model, x̂ in the model quantized so far, both from
ONNX Runtime: layerinputs.py), by a solver on Gram matrices (gptq.py: rounding with error
feedback; adaround.py: learned rounding); a row where the solver's answer fits worse than
rounding to nearest keeps the latter, judged on the fit's own samples or, with ``held_out``,
on samples kept out of the fit (with few samples per input column a solver fits their
noise).  Layers whose inputs do not depend on each other
are collected in one pass (a "wave").  A pruned layer's solver keeps its pruned entries at 0.
Statistics correction then sets each bias so that the
layer's mean output matches the float model's: b + W E[x] − Ŵ E[x̂].

The grid of each weight is fixed here (its range from ``weight_clipping`` on the float
weight); the Solution records it in ``weight_grids`` so that the clipping stage after this one
keeps it and only chooses activation ranges.  The model quantized so far uses activation
ranges from the config's calibrator (lp where the method is lapq).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..data import model_inputs, padding_mask
from ..export import export_qdq
from ..adaround import adaround
from ..gptq import gptq
from ..layerinputs import COLUMNS_PER_INPUT, InputCollector, LayerGram, LayerInput, waves
from ..options import CALIBRATORS
from ..params import QParams, range_of
from ..plan import QuantPlan, WeightSite
from ..progress import Progress
from ..rowgrid import RowGrid, better_than_nearest, row_error
from ..solution import Solution
from ..unfold import LayerShape
from .base import RunContext, StageRecord
from .calibrators import activation_observers, choose_ranges

# solver name -> Ŵ [G, r, d] from (W, Ĥ, C, grid, ReconstructionOptions, support: the kept entries of a pruned layer or None)
SOLVERS = {
    "gptq": lambda w, hessian, cross, grid, o, support: gptq(
        w, hessian, cross, grid, damping=o.damping, act_order=o.act_order, block=o.block, support=support,
    ),
    "adaround": lambda w, hessian, cross, grid, o, support: adaround(
        w, hessian, cross, grid, iterations=o.iterations, regularization=o.regularization, damping=o.damping, support=support,
    ),
}


@dataclass(frozen=True)
class LayerRecord:
    """One layer's relative output error E‖Wx − Ŵx̂‖² / E‖Wx‖², rounded to nearest and
    reconstructed (never above the former: a row where the solver loses keeps the nearest
    rounding), measured on the held-out patches where there are any; how many patches the
    fit sampled of how many, and how many held-out patches judged it."""

    node: str
    error_nearest: float
    error_reconstructed: float
    sampled: int
    positions: int
    held_out: int


@dataclass(frozen=True, kw_only=True)
class ReconstructionRecord(StageRecord):
    """The layers a reconstruction solved, those it left to rounding (and why), and where its
    time went (in the summary; the report's ``seconds`` has the stage's total)."""

    solver: str
    layers: tuple[LayerRecord, ...]
    skipped: tuple[tuple[str, str], ...]  # (node, why it was rounded to nearest instead)
    collect_seconds: float
    solve_seconds: float
    max_columns: int

    def report(self) -> dict[str, Any]:
        return {"reconstruction": {
            "solver": self.solver,
            "layers": [vars(layer) for layer in self.layers],
            "skipped": [{"node": node, "reason": why} for node, why in self.skipped],
            "sampling": (
                f"up to {self.max_columns} patches per layer and {COLUMNS_PER_INPUT} per column of its patch, drawn uniformly at "
                "random in proportion to each batch's rows; means over every patch; errors on the held-out patches where any"
            ),
        }}

    def summary(self) -> str:
        if not self.layers:
            return f"{self.solver}: no layer reconstructed"
        before = np.median([layer.error_nearest for layer in self.layers])
        after = np.median([layer.error_reconstructed for layer in self.layers])
        skipped = f", {len(self.skipped)} rounded to nearest" if self.skipped else ""
        return (
            f"{self.solver}: {len(self.layers)} layers, median output error {before:.3g} -> {after:.3g}{skipped} "
            f"({self.collect_seconds:.0f} s collecting inputs, {self.solve_seconds:.0f} s solving)"
        )


@dataclass(frozen=True)
class Reconstruct:
    """Sequential layer-wise reconstruction of the weights by ``solver`` (one of SOLVERS)."""

    solver: str
    keeps_batches: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.solver

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return activation_observers(plan)

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, ReconstructionRecord]:
        config, plan, options = context.config, context.plan, context.config.reconstruction
        nodes = {n.name: n for n in context.model.graph.node}
        order = {n.name: i for i, n in enumerate(context.model.graph.node)}
        sites = sorted(plan.weights, key=lambda s: order[s.node])
        shapes = {s.tensor: LayerShape.of(nodes[s.node], solution.weights[s.tensor].shape) for s in sites}
        skipped = [(s.node, shapes.pop(s.tensor)) for s in sites if isinstance(shapes[s.tensor], str)]  # why it is not unfolded
        act_method = config.method if config.method in CALIBRATORS else "lp"
        ranges = choose_ranges(
            solution, plan, context.stats, act_method, config.calibration,
            weight_symmetric=config.symmetric_weights, act_symmetric=config.act_symmetric, weight_method=options.weight_clipping,
        )
        params = context.params(ranges)
        biases = {b.node: b for b in plan.biases}
        weights, grids, records = dict(solution.weights), dict(solution.weight_grids), []
        collect_seconds = solve_seconds = 0.0
        batches = list(model_inputs(context.batches, config.label_key))
        todo = [s for s in sites if s.tensor in shapes]
        collector = InputCollector(
            context.model, batches, max_columns=options.max_columns, seed=config.seed,
            mask_input=padding_mask(context.model, config.mask_input), cache_bytes=options.cache_budget_mb << 20, held_out=options.held_out,
        )
        for wave in waves(context.model, todo):
            started = time.perf_counter()
            current = solution.but(weights=weights, weight_grids=grids)
            quantized = export_qdq(context.model, plan, params, current)
            exported = {n.name: n for n in quantized.graph.node}
            wanted = [LayerInput(s.node, shapes[s.tensor], nodes[s.node].input[0], exported[s.node].input[0]) for s in wave]
            grams = collector.collect(quantized, wanted)
            collect_seconds += time.perf_counter() - started
            started = time.perf_counter()
            for site, (gram, held) in zip(wave, grams):
                record, new_weight, shift = reconstruct_layer(
                    site, shapes[site.tensor], gram, held, current.weight(site.tensor), params[site.tensor], self.solver, options,
                    current.masks.get(site.tensor),
                )
                weights[site.tensor] = new_weight
                grids[site.tensor] = range_of(params[site.tensor])
                bias = biases.get(site.node)
                if bias is not None and options.statistics_correction and shift.size == weights[bias.tensor].size:
                    weights[bias.tensor] = (weights[bias.tensor] + shift.reshape(weights[bias.tensor].shape)).astype(np.float32)
                records.append(record)
                context.notify(Progress("reconstruct", len(records), len(todo)))
            solve_seconds += time.perf_counter() - started
        record = ReconstructionRecord(
            stage=self.name, solver=self.solver, layers=tuple(records), skipped=tuple(skipped),
            collect_seconds=collect_seconds, solve_seconds=solve_seconds, max_columns=options.max_columns,
        )
        return solution.but(weights=weights, weight_grids=grids), record


def reconstruct_layer(site: WeightSite, shape: LayerShape, gram: LayerGram, held: LayerGram, weight: np.ndarray, qp: QParams, solver: str,
                      options, mask: np.ndarray | None):
    """(record, reconstructed weight, the bias shift of statistics correction) of one layer,
    fitted on ``gram`` and judged on ``held`` (the held-out entries; on ``gram`` where none);
    the entries ``mask`` (the weight's N:M mask, or None) prunes stay 0."""
    w = shape.to_matrix(weight)
    support = None if mask is None else shape.to_matrix(mask) > 0.5
    groups, rows, _ = w.shape
    grid = _row_grid(qp, groups * rows)
    hessian, cross, float_gram = _dropped(gram.mean("hessian"), gram.mean("cross"), gram.mean("float_hessian"), options.qdrop)
    nearest = grid.quantize(w.reshape(groups * rows, -1)).reshape(w.shape)
    judge = held if held.sampled else gram
    judged = (judge.mean("hessian"), judge.mean("cross")) if held.sampled else (hessian, cross)
    w_hat = better_than_nearest(w, *judged, SOLVERS[solver](w, hessian, cross, grid, options, support), nearest)
    float_judged = judge.mean("float_hessian") if held.sampled else float_gram
    energy = float(np.einsum("grd,grd->", w, w @ float_judged))

    def error(candidate: np.ndarray) -> float:
        return float(max(row_error(w, *judged, candidate, float_judged).sum(), 0.0) / energy) if energy > 0 else 0.0

    shift = gram.output_shift(w, w_hat)
    record = LayerRecord(site.node, round(error(nearest), 6), round(error(w_hat), 6), gram.sampled, gram.positions, held.sampled)
    return record, shape.from_matrix(w_hat), shift


def _dropped(hessian: np.ndarray, cross: np.ndarray, float_gram: np.ndarray, drop: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Ĥ, C, F) of the input x̃ = m⊙x̂ + (1 − m)⊙x whose elements come from the float model with
    probability ``drop`` (QDrop, Wei et al.): E[x̃x̃ᵀ] = q²Ĥ + d²F + qd(C + Cᵀ) off the diagonal
    and q·diag Ĥ + d·diag F on it, E[x̃xᵀ] = qC + dF, with q = 1 − drop, d = drop."""
    if drop == 0.0:
        return hessian, cross, float_gram
    keep = 1.0 - drop
    mixed = keep**2 * hessian + drop**2 * float_gram + keep * drop * (cross + np.swapaxes(cross, 1, 2))
    index = np.arange(hessian.shape[1])
    mixed[:, index, index] = keep * hessian[:, index, index] + drop * float_gram[:, index, index]
    return mixed, keep * cross + drop * float_gram, float_gram


def _row_grid(qp: QParams, rows: int) -> RowGrid:
    """The grid of a weight's matrix rows: per channel (the output axis), per tensor, or blockwise
    (a MatMul's [K/block, N] parameters, transposed to [N, K/block])."""
    if qp.block_size is not None:
        return RowGrid(np.asarray(qp.scale).T, np.asarray(qp.zero_point).T, qp.fmt, qp.block_size)
    return RowGrid.of(qp.scale, qp.zero_point, qp.fmt, rows)
