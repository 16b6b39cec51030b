"""Checks of a model and its plan before any numbers: refusals (ModelError) and warnings.

Refused: a weight or bias to quantize that holds NaN or Inf, or that is an initializer a
caller may override (a graph input: quantizing would freeze it), and a model that is already
quantized.  Warned: exclusions that match nothing, and layers inside Loop/If/Scan subgraphs
(they stay float).
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .config import QuantConfig
from .errors import ModelError
from .graphindex import GraphIndex, subgraphs
from .ops import QUANTIZED_OPS

if TYPE_CHECKING:
    from .plan import QuantPlan

log = logging.getLogger(__name__)


def warn_unused_exclusions(graph: onnx.GraphProto, config: QuantConfig) -> None:
    """A warning for each exclusion that matches no node: most often a pattern meant to match
    part of a name (patterns match whole names) or an op type spelled in another case."""
    names = [n.name for n in graph.node]
    op_types = {n.op_type for n in graph.node}
    for pattern in config.exclude:
        if any(re.fullmatch(pattern, name) for name in names):
            continue
        if pattern in op_types:
            hint = "an op type: give it as an excluded op type" if pattern in config.op_types else f"{pattern} nodes are never quantized"
        else:
            hint = (f"patterns match whole names, as they are after BatchNormalization folding: {pattern + '.*'!r} "
                    "matches names that start with it")
            spelled = next((t for t in sorted(op_types) if t.lower() == pattern.lower()), None)
            if spelled:
                hint += f"; the op type is spelled {spelled!r}"
        log.warning("exclude pattern %r matches no node name, so it excludes nothing (%s)", pattern, hint)
    for op_type in config.exclude_op_types:
        if op_type not in op_types:
            log.warning("excluded op type %r: the model has no %s node", op_type, op_type)


def refuse_quantized(graph: onnx.GraphProto) -> None:
    """ModelError when ``graph`` holds ops only a quantized model has."""
    found = sorted({n.op_type for n in graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})
    if found:
        raise ModelError(f"the model is already quantized (it has {', '.join(found)} nodes): give onnx_lapq the float model it was made from")


def _nested_layers(node: onnx.NodeProto, op_types) -> int:
    """How many nodes of ``op_types`` the subgraphs of ``node`` hold, at any depth."""
    inner = [n for g in subgraphs(node) for n in g.node]
    return sum(n.op_type in op_types for n in inner) + sum(_nested_layers(n, op_types) for n in inner)


def warn_subgraph_layers(graph: onnx.GraphProto, config: QuantConfig) -> None:
    """A warning for each Loop/If/Scan node whose subgraphs hold layers: they stay float."""
    for node in graph.node:
        layers = _nested_layers(node, config.op_types)
        if layers:
            log.warning(
                "%d %s layer%s inside the subgraphs of %s node %r stay%s float: onnx_lapq quantizes the main graph only",
                layers, "/".join(config.op_types), "" if layers == 1 else "s", node.op_type, node.name, "s" if layers == 1 else "",
            )


def check_weights(index: GraphIndex, plan: QuantPlan) -> QuantPlan:
    """``plan``, once every weight and bias it quantizes is constant (ModelError naming all that a caller
    may override) and finite (ModelError naming the first that is not)."""
    inputs = {i.name for i in index.graph.input}
    quantized = [(w.tensor, w.node) for w in plan.weights] + [(b.tensor, b.node) for b in plan.biases]
    overridable = [(tensor, node) for tensor, node in quantized if tensor in inputs]
    if overridable:
        nodes = list(dict.fromkeys(node for _, node in overridable))
        raise ModelError(
            f"weights {', '.join(f'{t!r} of node {n!r}' for t, n in overridable)}: "
            "each also a graph input, which ONNX Runtime lets a caller override, and a quantized one cannot be: remove the "
            "weights from the graph inputs (onnxruntime/tools/python/remove_initializer_from_input.py does it) or keep "
            f"the layers float with --exclude {' '.join(nodes)}"
        )
    for tensor, node in quantized:
        kind = "bias" if any(b.tensor == tensor for b in plan.biases) else "weight"
        values = index.constant(tensor)
        if not np.isfinite(values).all():
            bad = {"NaN": int(np.isnan(values).sum()), "Inf": int(np.isinf(values).sum())}
            found = " and ".join(f"{n} {what}" for what, n in bad.items() if n)
            raise ModelError(
                f"{kind} {tensor!r} of node {node!r} holds {found} of {values.size} values, which quantization cannot "
                f"represent: fix the model's weights (a trained model has finite ones) or keep the layer float with --exclude {node}"
            )
    return plan

