"""Bit operations of a model's weight layers: multiply-accumulates × weight bits × input bits.

A layer's multiply-accumulates (MACs) per sample are its output elements times the length of
the sum behind each one, the weight's elements per output channel (C_in/g · kh · kw for a
Conv, K for a MatMul or Gemm; output channels on axis 1 of a Conv's output, last elsewhere),
or, for a ConvTranspose, its input elements times the weight's elements per input channel.
Tensor sizes come from one float pass over the first sample of a calibration batch, so
symbolic dimensions (a sequence length) take that sample's values.  A layer's input bits
are those of the activation site on its first input, 32 where that input stays float.
"""
from __future__ import annotations

import numpy as np
import onnx

from .plan import QuantPlan, WeightSite
from .runtime import session

FLOAT_BITS = 32


def layer_macs(model: onnx.ModelProto, sites: list[WeightSite], weights: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> np.ndarray:
    """MACs per sample of each site's layer ([sites]), measured on the first sample of ``batch``."""
    nodes = {n.name: n for n in model.graph.node}
    sample = {name: value[:1] for name, value in batch.items()}
    wanted = list(dict.fromkeys(_measured_tensor(nodes[s.node]) for s in sites))
    shapes = dict(zip(wanted, (v.shape for v in session(model, outputs=wanted).run(wanted, sample))))
    macs = []
    for site in sites:
        node, weight = nodes[site.node], weights[site.tensor]
        shape = shapes[_measured_tensor(node)]
        if node.op_type == "ConvTranspose":  # each input element meets the kernels of its input channel
            macs.append(np.prod(shape) * weight.size / weight.shape[0])
        else:
            macs.append(np.prod(shape) * weight.size / shape[1 if node.op_type == "Conv" else -1])
    return np.asarray(macs, np.float64)


def input_bits(plan: QuantPlan, model: onnx.ModelProto, sites: list[WeightSite]) -> np.ndarray:
    """The width of each site's layer input ([sites]): its activation group's bits, else FLOAT_BITS."""
    return np.asarray([FLOAT_BITS if g is None else plan.group_bits(g) for g in input_groups(plan, model, sites)], np.float64)


def input_groups(plan: QuantPlan, model: onnx.ModelProto, sites: list[WeightSite]) -> list[str | None]:
    """The activation group of each site's layer input ([sites]), None where that input stays float."""
    nodes = {n.name: n for n in model.graph.node}
    groups = {a.tensor: a.group for a in plan.activations}
    return [groups.get(nodes[s.node].input[0]) for s in sites]


def _measured_tensor(node: onnx.NodeProto) -> str:
    return node.input[0] if node.op_type == "ConvTranspose" else node.output[0]
