"""N:M sparsity as a stage: weight masks, and the kept weights re-fitted without training.

Each Conv, Gemm and MatMul weight of the plan (first and last layers and ``dense_layers``
kept dense, as the options say) gets a mask along its reduction dimension in sparse
kernels' layout (nmmask.py); a layer whose shape does not allow the pattern stays dense
and is named in the record, never silently.  The masks go in the Solution, which zeroes the
pruned weights wherever its values are taken (the export stores them as the zero code).

Repair (AdaPrune's aim, in closed form): front to back, each layer's kept weights are the
masked least-squares fit of the dense layer's outputs, min E‖w x − ŵ x̂‖² over ŵ with the
mask's support, where x is the layer's input in the float model and x̂ in the model pruned
so far (layerinputs.py's Gram statistics, as the reconstruction reads them): per row,
Ĥ_SS ŵ_S = (C w)_S with Ĥ = E[x̂x̂ᵀ], C = E[x̂xᵀ], damped.  Statistics correction then moves
the bias so that the layer's mean output matches the dense one.  Quantization comes after,
on the pruned weights.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import model_inputs, padding_mask
from ..errors import ConfigError
from ..largemodel import copy_model
from ..layerinputs import InputCollector, LayerGram, LayerInput, waves
from ..nmmask import from_reduction_matrix, mask_of, reduction_matrix
from ..plan import QuantPlan
from ..progress import Progress
from ..rowgrid import row_error
from ..solution import Solution
from ..unfold import LayerShape
from .base import RunContext, StageRecord

SOLVE_ROWS = 64  # rows whose masked systems are solved at once (memory: rows x kept² floats)


@dataclass(frozen=True)
class PrunedLayer:
    """One pruned layer: the share of |w| its mask keeps, and its relative output error
    E‖Wx − Ŵx̂‖² / E‖Wx‖² with the mask alone and after the repair (None without repair)."""

    node: str
    kept_magnitude: float
    error_masked: float | None = None
    error_repaired: float | None = None


@dataclass(frozen=True, kw_only=True)
class SparsityRecord(StageRecord):
    """The pattern, the layers pruned and those kept dense (and why), and the repair's time."""

    pattern: str
    masks: str
    layers: tuple[PrunedLayer, ...]
    dense: tuple[tuple[str, str], ...]
    repair_seconds: float

    def report(self) -> dict[str, Any]:
        return {"sparsity": {
            "pattern": self.pattern, "masks": self.masks, "layers": [vars(layer) for layer in self.layers],
            "dense": [{"node": node, "reason": why} for node, why in self.dense], "repair_seconds": round(self.repair_seconds, 3),
        }}

    def summary(self) -> str:
        repaired = [layer for layer in self.layers if layer.error_repaired is not None]
        errors = (
            f", median output error {np.median([layer.error_masked for layer in repaired]):.3g} masked -> "
            f"{np.median([layer.error_repaired for layer in repaired]):.3g} repaired ({self.repair_seconds:.0f} s)" if repaired else ""
        )
        dense = f"; dense: {', '.join(f'{node} ({why})' for node, why in self.dense)}" if self.dense else ""
        return f"sparsity {self.pattern} ({self.masks}): {len(self.layers)} layers pruned{errors}{dense}"


@dataclass(frozen=True)
class Sparsify:
    """Prune the weights to an N:M pattern and repair the kept ones (see the module docstring)."""

    name: ClassVar[str] = "sparsify"
    repair: bool = True

    @property
    def keeps_batches(self) -> bool:
        return self.repair

    def observers(self, plan: QuantPlan, config) -> dict[str, frozenset[str]]:
        return {}

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, SparsityRecord]:
        options = context.config.sparsity
        n, m = options.pattern_nm()
        nodes = {node.name: node for node in context.model.graph.node}
        order = {node.name: i for i, node in enumerate(context.model.graph.node)}
        sites = sorted((s for s in context.plan.weights if s.op_type in ("Conv", "Gemm", "MatMul")), key=lambda s: order[s.node])
        edges = {sites[0].node, sites[-1].node} if options.dense_first_last and sites else set()
        masks, shapes, kept, dense = {}, {}, {}, []
        for site in sites:
            weight = solution.weights[site.tensor]
            shape = LayerShape.of(nodes[site.node], weight.shape)
            why = _why_dense(site.node, edges, options.dense_layers, shape)
            if why is None:
                try:
                    matrix = reduction_matrix(site.op_type, weight, shape.trans_b)
                    mask = mask_of(matrix, n, m, options.masks)
                except ConfigError as exc:
                    why = str(exc).split(":")[0]
            if why is not None:
                dense.append((site.node, why))
                continue
            masks[site.tensor] = from_reduction_matrix(site.op_type, mask, weight.shape, shape.trans_b)
            shapes[site.tensor] = shape
            kept[site.node] = float(np.abs(matrix[mask]).sum() / max(np.abs(matrix).sum(), 1e-30))
        solution = solution.but(masks={**solution.masks, **masks})
        layers = {site.node: PrunedLayer(site.node, round(kept[site.node], 6)) for site in sites if site.tensor in masks}
        started = time.perf_counter()
        if self.repair and masks:
            solution, layers = _repair(context, solution, [s for s in sites if s.tensor in masks], shapes, layers)
        record = SparsityRecord(
            stage=self.name, pattern=options.pattern, masks=options.masks, layers=tuple(layers.values()), dense=tuple(dense),
            repair_seconds=time.perf_counter() - started,
        )
        return solution, record


def _why_dense(node: str, edges: set[str], dense_layers: tuple[str, ...], shape) -> str | None:
    if node in edges:
        return "first or last layer"
    if any(re.fullmatch(p, node) for p in dense_layers):
        return "excluded"
    return shape if isinstance(shape, str) else None


def _repair(context: RunContext, solution: Solution, sites, shapes: dict[str, LayerShape], layers: dict[str, PrunedLayer]):
    """The Solution with each pruned layer's kept weights (and bias) re-fitted, front to back."""
    config = context.config
    nodes = {node.name: node for node in context.model.graph.node}
    biases = {b.node: b for b in context.plan.biases}
    collector = InputCollector(
        context.model, list(model_inputs(context.batches, config.label_key)), max_columns=config.reconstruction.max_columns,
        seed=config.seed, mask_input=padding_mask(context.model, config.mask_input), cache_bytes=config.reconstruction.cache_budget_mb << 20,
    )
    weights = dict(solution.weights)
    done = 0
    for wave in waves(context.model, sites):
        current = solution.but(weights=weights)
        pruned = _with_values(context.model, {s.tensor: current.weight(s.tensor) for s in sites} | _bias_values(weights, biases, sites))
        wanted = [LayerInput(s.node, shapes[s.tensor], nodes[s.node].input[0], nodes[s.node].input[0]) for s in wave]
        for site, (gram, _) in zip(wave, collector.collect(pruned, wanted)):
            shape = shapes[site.tensor]
            w = shape.to_matrix(solution.weights[site.tensor])
            support = shape.to_matrix(solution.masks[site.tensor]) > 0.5
            fitted = _masked_least_squares(w, support, gram, config.sparsity.repair_damping)
            weights[site.tensor] = shape.from_matrix(fitted)
            bias = biases.get(site.node)
            if bias is not None:
                weights[bias.tensor] = (weights[bias.tensor] + gram.output_shift(w, fitted).reshape(weights[bias.tensor].shape)).astype(np.float32)
            layers[site.node] = PrunedLayer(site.node, layers[site.node].kept_magnitude, _error(w, w * support, gram), _error(w, fitted, gram))
            done += 1
            context.notify(Progress("sparsify", done, len(sites)))
    return solution.but(weights=weights), layers


def _masked_least_squares(w: np.ndarray, support: np.ndarray, gram: LayerGram, damping: float) -> np.ndarray:
    """[G, r, d]: per row, the weights on ``support`` minimizing E‖w x − ŵ x̂‖² (zero elsewhere)."""
    hessian, cross = gram.mean("hessian"), gram.mean("cross")
    fitted = np.zeros_like(w)
    for g in range(len(w)):
        h = hessian[g] + damping * max(float(np.mean(np.diag(hessian[g]))), 1e-12) * np.eye(hessian.shape[1])
        target = w[g] @ cross[g].T  # row r: (C wᵣᵀ)ᵀ
        counts = support[g].sum(axis=1)
        for count in np.unique(counts[counts > 0]):
            rows = np.flatnonzero(counts == count)
            for start in range(0, len(rows), SOLVE_ROWS):
                chunk = rows[start:start + SOLVE_ROWS]
                idx = np.nonzero(support[g, chunk])[1].reshape(len(chunk), count)
                systems = h[idx[:, :, None], idx[:, None, :]]
                solved = np.linalg.solve(systems, np.take_along_axis(target[chunk], idx, axis=1)[:, :, None])[:, :, 0]
                block = np.zeros((len(chunk), w.shape[2]))
                np.put_along_axis(block, idx, solved, axis=1)
                fitted[g, chunk] = block
    return fitted


def _error(w: np.ndarray, candidate: np.ndarray, gram: LayerGram) -> float:
    """E‖w x − ŵ x̂‖² / E‖w x‖² over the layer's rows."""
    float_gram = gram.mean("float_hessian")
    energy = float(np.einsum("grd,grd->", w, w @ float_gram))
    error = float(row_error(w, gram.mean("hessian"), gram.mean("cross"), candidate, float_gram).sum())
    return round(max(error, 0.0) / energy, 6) if energy > 0 else 0.0


def _bias_values(weights: dict[str, np.ndarray], biases, sites) -> dict[str, np.ndarray]:
    return {biases[s.node].tensor: weights[biases[s.node].tensor] for s in sites if s.node in biases}


def _with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers named in ``values`` replaced by them."""
    out = copy_model(model, without=set(values))
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in values.items())
    return out
