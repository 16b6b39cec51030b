"""Reconstructed weights for the sensitivity probes: each layer at each narrower width, fitted alone.

Where a run reconstructs its weights (gptq, adaround), what a layer loses at a narrow width
is the loss of its reconstructed weight, not of its rounding to nearest.  In a probe every
other layer is at the widest width, so each layer's inputs are those of the model at the
widest widths: collected through ONNX Runtime for a group of layers per pass
(layerinputs.InputCollector, positions subsampled as the reconstruction stage does), then each
(layer, width) is fitted on them by GPTQ, the fast solver, standing in for either (the
reconstruction stage's ``reconstruct_layer``: rounding to nearest where that fits better).
The result maps (tensor, bits) to the weight a probe of that layer at that width evaluates
(sensitivity.ProbeJob.replaced).
"""
from __future__ import annotations

import numpy as np
import onnx

from .data import padding_mask
from .export import export_qdq
from .layerinputs import InputCollector, LayerInput
from .methods.reconstruction import reconstruct_layer
from .sensitivity import WidthProbe
from .unfold import LayerShape

LAYERS_PER_PASS = 16  # layers whose inputs one collection pass keeps for every batch at once
PROBE_SOLVER = "gptq"


def probe_weights(model: onnx.ModelProto, probe: WidthProbe, widths: tuple[int, ...], batches: list[dict[str, np.ndarray]],
                  config) -> dict[tuple[str, int], np.ndarray]:
    """(tensor, bits) -> the weight reconstructed at ``bits`` on its inputs in the model at the
    plan's widths, for every weight site the reconstruction unfolds and every narrower width."""
    nodes = {n.name: n for n in model.graph.node}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    solution, options = probe.solution, config.reconstruction
    shapes = {s.tensor: LayerShape.of(nodes[s.node], solution.weights[s.tensor].shape) for s in probe.plan.weights}
    todo = sorted((s for s in probe.plan.weights if not isinstance(shapes[s.tensor], str) and any(b < s.bits for b in widths)),
                  key=lambda s: order[s.node])
    quantized = export_qdq(model, probe.plan, probe.params(), solution)
    exported = {n.name: n for n in quantized.graph.node}
    collector = InputCollector(model, batches, max_columns=options.max_columns, seed=config.seed, mask_input=padding_mask(model, config.mask_input),
                               cache_bytes=options.cache_budget_mb << 20)
    out = {}
    for start in range(0, len(todo), LAYERS_PER_PASS):
        group = todo[start:start + LAYERS_PER_PASS]
        wanted = [LayerInput(s.node, shapes[s.tensor], nodes[s.node].input[0], exported[s.node].input[0]) for s in group]
        for site, (gram, held) in zip(group, collector.collect(quantized, wanted)):
            for bits in (b for b in widths if b < site.bits):
                qp = probe.params({site.tensor: bits})[site.tensor]
                _, weight, _ = reconstruct_layer(site, shapes[site.tensor], gram, held, solution.weight(site.tensor), qp, PROBE_SOLVER, options,
                                                 solution.masks.get(site.tensor))
                out[(site.tensor, bits)] = weight
    return out
