"""How a plan's activation sites relate: which share one scale, which are dropped, which
are stored in 8-bit containers, and what bounds their values.

* Tied: ONNX Runtime needs equal scales around a value-preserving op (PASS_THROUGH_OPS)
  and between a Concat and its inputs; such sites share one parameter group where the
  group runs on integers (``fuses_to_integer``).
* Dropped: at other widths a pass-through output site goes, since its values are already
  on its input's grid; this keeps ONNX Runtime from rewriting a 4-bit DQ -> MaxPool -> Q
  pair into a MaxPool on 4-bit integers.
* Wide: sub-8-bit sites next to a WIDE_CONTAINER_OPS op, or read by a layer whose weights
  are not 4-bit, keep their codes in 8-bit integers (same grid, same numbers).
* Ceilings: the least constant max of the Clips that make a group's tensors.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .graphindex import GraphIndex, consumer_map
from .ops import PASS_THROUGH_OPS, WIDE_CONTAINER_OPS, fuses_to_integer

if TYPE_CHECKING:
    from .plan import ActivationSite, QuantPlan


def clip_ceilings(index: GraphIndex, sites) -> tuple[tuple[str, float], ...]:
    """Activation group -> the least constant max of the Clips that make its tensors."""
    ceilings: dict[str, float] = {}
    for site in sites:
        producer = index.producer.get(site.tensor)
        if producer is None or producer.op_type != "Clip" or len(producer.input) < 3:
            continue
        top = index.constant(producer.input[2])
        if top is not None:
            ceilings[site.group] = min(float(top), ceilings.get(site.group, np.inf))
    return tuple(ceilings.items())


def reading_order(index: GraphIndex, tensors) -> tuple[str, ...]:
    """``tensors`` by the first node that reads them; a layer's input before its weight."""
    first: dict[str, int] = {}
    for position, node in enumerate(index.graph.node):
        for name in node.input:
            first.setdefault(name, position)
    weights = set(index.initializers)
    return tuple(sorted(tensors, key=lambda t: (first.get(t, len(index.graph.node)), t in weights)))


def tensor_order(index: GraphIndex) -> list[str]:
    """Graph inputs, then every node output, in graph order."""
    names = [i.name for i in index.graph.input]
    for node in index.graph.node:
        names.extend(node.output)
    return names


def group_sites(index: GraphIndex, acts: dict[str, ActivationSite]) -> tuple[dict[str, ActivationSite], dict[str, str]]:
    """Tie sites that ONNX Runtime wants on one scale; drop pass-through outputs where the
    pass-through group does not run on integers.  Also returns the dropped tensors -> the
    site whose grid they are on."""
    parent = {name: name for name in acts}
    aliases: dict[str, str] = {}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in index.graph.node:
        if node.op_type in PASS_THROUGH_OPS and node.input and node.input[0] in acts and node.output[0] in acts:
            src, dst = acts[node.input[0]], acts[node.output[0]]
            if src.bits == dst.bits and fuses_to_integer(src.bits, dst.bits):
                parent[find(dst.tensor)] = find(src.tensor)
            elif src.bits == dst.bits:
                del acts[dst.tensor], parent[dst.tensor]
                _redirect(parent, dst.tensor, src.tensor)
                aliases[dst.tensor] = aliases.get(src.tensor, src.tensor)
        elif node.op_type == "Concat" and node.output[0] in acts:
            inputs = [i for i in node.input if i not in index.initializers]
            if all(i in acts and acts[i].bits == acts[node.output[0]].bits for i in inputs):
                for name in inputs:
                    parent[find(name)] = find(node.output[0])
    return {name: replace(s, group=find(name)) for name, s in acts.items()}, aliases


def mark_wide(index: GraphIndex, acts: dict[str, ActivationSite], consumer_weight_bits: dict[str, list[int]]) -> dict[str, ActivationSite]:
    """Sub-8-bit sites next to a WIDE_CONTAINER_OPS op, or read by a layer whose weights are
    not 4-bit (ONNX Runtime would fuse an 8-bit weight with a 4-bit input into a kernel that
    rejects it), keep their codes in 8-bit integers."""
    out = {}
    for name, site in acts.items():
        producer = index.producer.get(name)
        neighbours = [producer.op_type] if producer is not None else []
        neighbours += [n.op_type for n in index.consumers.get(name, [])]
        mixed = any(bits != 4 for bits in consumer_weight_bits.get(name, []))
        wide = site.bits < 8 and (mixed or any(op in WIDE_CONTAINER_OPS for op in neighbours))
        out[name] = replace(site, wide=wide)
    return out


def carried_in_bytes(model: onnx.ModelProto, plan: QuantPlan) -> QuantPlan:
    """``plan`` with its sub-8-bit activation sites that only convolutions read stored in
    8-bit containers (``wide``: a Clip to the grid, then an 8-bit QuantizeLinear), for the
    loss evaluator's graphs only; the exported model keeps its 4-bit types.

    The values are the same bit for bit: the Clip stops the 8-bit code where the 4-bit one
    saturates.  ONNX Runtime's 4-bit QuantizeLinear and DequantizeLinear are several times
    slower than its 8-bit ones.  Only convolution inputs: in an 8-bit container ONNX Runtime
    fuses a Gemm or MatMul with its DequantizeLinear inputs into an integer kernel even when
    the numbers are fed, which the exported 4-bit graph never gets, so the search would
    measure another model than the one exported; a fed convolution's weight arrives as
    floats, so nothing fuses there."""
    consumers = consumer_map(model.graph.node)

    def conv_only(tensor: str) -> bool:
        readers = {n.op_type for n in consumers.get(tensor, [])}
        return bool(readers) and readers <= {"Conv", "ConvTranspose"}

    activations = tuple(replace(a, wide=True) if a.bits < 8 and conv_only(a.tensor) else a for a in plan.activations)
    return replace(plan, activations=activations)


def _redirect(parent: dict[str, str], removed: str, target: str) -> None:
    for name, p in parent.items():
        if p == removed:
            parent[name] = target
