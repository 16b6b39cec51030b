"""Rewrites of linear layers on an onnx-graphsurgeon graph, for graph.normalize.

  * fold_batchnorm: a BatchNormalization that alone reads a Conv/ConvTranspose/Gemm output
    becomes the layer's weight and bias;
  * fold_conv_bias_add: a constant per-channel Add after a bias-less Conv becomes its bias;
  * fold_matmul_bias_add: a 2-D MatMul with a constant weight and a constant per-column Add
    after it become one Gemm;
  * unfold_gemm: a Gemm with a constant weight (transA=0, alpha=1) becomes MatMul + Add.
Each edits the graph in place; the caller cleans it up.  The folds read input ranks from the
tensors' shapes, so a graph whose shapes are unknown folds less.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .ops import output_channel_axis

log = logging.getLogger(__name__)


def _sole_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    return tensor.outputs[0]


def fold_batchnorm(graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
            continue
        if node.op == "ConvTranspose" and node.attrs.get("group", 1) != 1:
            continue
        bn = _sole_consumer(node.outputs[0], graph)
        if bn is None or bn.op != "BatchNormalization" or len(bn.outputs) != 1:
            continue
        weight = node.inputs[1]
        params = bn.inputs[1:5]
        if not isinstance(weight, gs.Constant) or not all(isinstance(p, gs.Constant) for p in params):
            continue
        gamma, beta, mean, var = (p.values.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        axis = output_channel_axis(node.op, weight.values.ndim, bool(node.attrs.get("transB", 0)))
        shape = [1] * weight.values.ndim
        shape[axis] = -1
        new_w = (weight.values.astype(np.float64) * factor.reshape(shape)).astype(np.float32)
        if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
            continue
        old_b = node.inputs[2].values.astype(np.float64) * node.attrs.get("beta", 1.0) if len(node.inputs) > 2 else np.zeros_like(mean)
        new_b = ((old_b - mean) * factor + beta).astype(np.float32)
        node.inputs[1] = gs.Constant(f"{weight.name}_bnfolded", new_w)
        bias = gs.Constant(f"{node.name}_bias_bnfolded", new_b)
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        node.outputs[0] = bn.outputs[0]
        bn.outputs.clear()
        log.debug("folded %s into %s", bn.name, node.name)


def _bias_add(node: gs.Node, graph: gs.Graph, shapes: tuple[tuple[int, ...], ...]) -> tuple[gs.Node, np.ndarray] | None:
    """The Add that alone reads ``node``'s output, and its constant, when that constant has
    one of ``shapes``."""
    add = _sole_consumer(node.outputs[0], graph)
    if add is None or add.op != "Add":
        return None
    const = next((np.asarray(t.values) for t in add.inputs if isinstance(t, gs.Constant)), None)
    if const is None or const.shape not in shapes:
        return None
    return add, const


def _absorb(node: gs.Node, add: gs.Node, bias: np.ndarray) -> None:
    """``node`` takes ``bias`` as its bias input and the Add's place in the graph."""
    node.inputs.append(gs.Constant(f"{node.name}_bias_folded", bias.reshape(-1).astype(np.float32)))
    node.outputs[0] = add.outputs[0]
    add.outputs.clear()


def fold_matmul_bias_add(graph: gs.Graph) -> None:
    """MatMul(x, W) -> Add(., c) with x of rank 2, W constant [K, N] and c of shape [N] or
    [1, N] becomes Gemm(x, W, c)."""
    for node in list(graph.nodes):
        if node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant) or len(node.inputs[1].shape) != 2:
            continue
        if node.inputs[0].shape is None or len(node.inputs[0].shape) != 2:
            continue
        columns = node.inputs[1].shape[1]
        found = _bias_add(node, graph, ((columns,), (1, columns)))
        if found is not None:
            node.op = "Gemm"
            _absorb(node, *found)


def unfold_gemm(graph: gs.Graph) -> None:
    """Gemm(x, B, C) with B constant, transA=0 and alpha=1 becomes MatMul(x, B or B^T) and,
    with a C, Add(., beta * C); the MatMul keeps the Gemm's name.  Gemms that share a
    weight or bias share its transposed or scaled constant."""
    made: dict[tuple[str, float | None], gs.Constant] = {}  # (source name, beta; None: transposed)

    def derived(source: gs.Constant, beta: float | None) -> gs.Constant:
        key = (source.name, beta)
        if key not in made:
            if beta is None:
                made[key] = gs.Constant(f"{source.name}_transposed", np.ascontiguousarray(source.values.T))
            else:
                made[key] = gs.Constant(f"{source.name}_beta", (source.values * np.float32(beta)).astype(source.values.dtype))
        return made[key]

    for node in list(graph.nodes):
        attrs = node.attrs
        if node.op != "Gemm" or not isinstance(node.inputs[1], gs.Constant) or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        beta = attrs.get("beta", 1.0)
        if bias is not None and beta != 1.0 and not isinstance(bias, gs.Constant):
            continue
        weight = node.inputs[1]
        if attrs.get("transB", 0):
            weight = derived(weight, None)
        output = node.outputs[0]
        node.op, node.attrs = "MatMul", {}
        node.inputs[1] = weight
        if len(node.inputs) > 2:
            node.inputs.pop()
        if bias is None:
            continue
        if beta != 1.0:
            bias = derived(bias, float(beta))
        product = gs.Variable(f"{node.name}_MatMul_Output", dtype=output.dtype)
        node.outputs[0] = product
        graph.nodes.append(gs.Node("Add", f"{node.name}_bias", inputs=[product, bias], outputs=[output]))


def fold_conv_bias_add(graph: gs.Graph) -> None:
    """Conv(x, W) -> Add(., c) with c of shape [C, 1, ...] or [1, C, 1, ...] (one value per
    output channel, broadcast over the spatial dimensions) becomes Conv(x, W, c)."""
    for node in list(graph.nodes):
        if node.op != "Conv" or len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        weight = node.inputs[1].values
        spatial = (1,) * (weight.ndim - 2)
        found = _bias_add(node, graph, ((weight.shape[0],) + spatial, (1, weight.shape[0]) + spatial))
        if found is not None:
            _absorb(node, *found)
