"""Where Q/DQ goes: the quantization sites of a normalized graph (no numbers, only places).

Sites:
  * weight:     the constant weight of each Conv/ConvTranspose/Gemm/MatMul that is not
                excluded; per-channel on the output-channel axis (``ops.output_channel_axis``),
                per-tensor on request.
  * activation: every non-constant float input of those ops ("input" role, the LAPQ
                sites).  Where a layer's group runs as an integer kernel
                (``ops.fuses_to_integer``) and the kernel requantizes its output
                (``ops.REQUANTIZED_OUTPUT_OPS``), the output is quantized too ("output"
                role), after a sole-consumer Relu or Clip(min >= 0) where there is one, so
                that ONNX Runtime fuses DQ -> op -> Q into one integer kernel; graph outputs
                stay float.  Other groups have no CPU kernel to fuse into and get only the
                input sites.
  * bias:       the float bias of Conv/Gemm with a quantized input, exported as int32 with
                scale s_in * s_w and zero point 0.
The widths of each layer come from a :class:`~onnx_lapq.bits.BitsPolicy`; an activation
read by layers of different widths takes the widest.
With quantize_attention, MatMuls of two activations get input sites on both sides.
With weight_only, the plan is the blockwise weights of 2-D MatMuls alone.
How sites share scales, are dropped or stored wide is ``grouping``'s job; the refusals
and warnings about the model are ``plancheck``'s.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import onnx

from .bits import BitsPolicy
from .config import QuantConfig
from .errors import ModelError
from .graphindex import GraphIndex
from .grouping import clip_ceilings, group_sites, mark_wide, reading_order, tensor_order
from .ops import BIAS_OPS, FUSABLE_ACTIVATIONS, REQUANTIZED_OUTPUT_OPS, fuses_to_integer, output_channel_axis
from .plancheck import check_weights, refuse_quantized, warn_subgraph_layers, warn_unused_exclusions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSite:
    tensor: str
    node: str
    op_type: str
    axis: int | None
    bits: int
    block_size: int | None = None  # blockwise along ``axis`` (weight-only MatMul)


@dataclass(frozen=True)
class ActivationSite:
    tensor: str
    bits: int
    role: str  # "input" (of a quantized op) or "output" (closes a fusable group)
    group: str  # tensor name of the site whose parameters this one uses
    wide: bool = False  # sub-8-bit codes stored in 8-bit integers (see WIDE_CONTAINER_OPS)


@dataclass(frozen=True)
class BiasSite:
    tensor: str
    node: str
    input_tensor: str
    weight_tensor: str
    op_type: str = "Conv"
    group: int = 1  # Conv groups
    trans_b: bool = True  # Gemm's transB
    scale_tensor: str | None = None  # the activation site whose scale s_in applies, when not input_tensor

    @property
    def scale_site(self) -> str:
        """The activation site whose scale is s_in (the layer input, or the site it is on the grid of)."""
        return self.scale_tensor or self.input_tensor

@dataclass(frozen=True)
class QuantPlan:
    weights: tuple[WeightSite, ...]
    activations: tuple[ActivationSite, ...]
    biases: tuple[BiasSite, ...]
    reads: tuple[str, ...] = ()  # weight and activation site tensors in the order the graph first reads them
    ceilings: tuple[tuple[str, float], ...] = ()  # activation group -> the Clip max its values never exceed

    @property
    def groups(self) -> tuple[str, ...]:
        """Parameter groups of activations, in graph order (one tunable clip each)."""
        return tuple(dict.fromkeys(a.group for a in self.activations))

    def ceiling(self, group: str) -> float | None:
        """The largest value a group's tensors can hold where a Clip makes them (the least max
        of its Clips; None where none does).  Where ONNX Runtime folds the Clip into its
        QuantizeLinear (``ops.folds_clip_into_quantize``), a clip above it keeps the Clip,
        which leaves the layer unfused."""
        return dict(self.ceilings).get(group)

    def group_bits(self, group: str) -> int:
        return next(a.bits for a in self.activations if a.group == group)

    def summary(self) -> dict:
        return {
            "weight_sites": len(self.weights),
            "activation_sites": len(self.activations),
            "activation_groups": len(self.groups),
            "bias_sites": len(self.biases),
        }



def _weight_axis(node: onnx.NodeProto, weight_ndim: int, per_channel: bool) -> int | None:
    trans_b = bool(next((a.i for a in node.attribute if a.name == "transB"), 0))
    return output_channel_axis(node.op_type, weight_ndim, trans_b) if per_channel else None


def _compute_nodes(index: GraphIndex, config: QuantConfig) -> list[onnx.NodeProto]:
    nodes = []
    for node in index.graph.node:
        if node.op_type not in config.op_types or config.excludes_node(node.name, node.op_type):
            continue
        if len(node.input) < 2 or index.constant(node.input[1]) is None:
            continue  # activation x activation (attention) or non-constant weights
        if index.initializers[node.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        if not index.is_float_activation(node.input[0]):
            continue
        nodes.append(node)
    return nodes


def _fused_output(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    out = node.output[0]
    follower = index.sole_consumer(out)
    if follower is not None and follower.op_type in FUSABLE_ACTIVATIONS:
        low = index.constant(follower.input[1]) if follower.op_type == "Clip" and len(follower.input) > 1 else 0.0
        if low is not None and float(low) >= 0.0:
            out = follower.output[0]
    return None if out in index.graph_outputs else out


def _attention_nodes(index: GraphIndex, config: QuantConfig) -> list[onnx.NodeProto]:
    """MatMuls of two float activations (attention scores and context)."""
    return [
        n for n in index.graph.node
        if n.op_type == "MatMul" and "MatMul" in config.op_types and not config.excludes_node(n.name, n.op_type)
        and all(index.is_float_activation(i) for i in n.input)
    ]


def _embedding_sites(index: GraphIndex, config: QuantConfig, bits: BitsPolicy) -> list[WeightSite]:
    """Constant 2-D float tables read by Gather (embeddings), when "Gather" is in op_types:
    per row, or in blocks along the row (axis 1) when weight-only."""
    sites = {}
    for node in index.graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.input else ""
        init = index.initializers.get(table)
        if init is None or "Gather" not in config.op_types or config.excludes_node(node.name, node.op_type):
            continue
        if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT or table in sites:
            continue
        axis, block = (1, config.block_size) if config.weight_only else (0, None)
        sites[table] = WeightSite(table, node.name, node.op_type, axis if config.per_channel or block else None, bits.bits(node.name)[0], block)
    return list(sites.values())


def _weight_only_plan(index: GraphIndex, nodes: list[onnx.NodeProto], config: QuantConfig, bits: BitsPolicy) -> QuantPlan:
    """Blockwise weights of 2-D MatMuls alone, blocks along K (axis 0): ONNX Runtime's MatMulNBits form."""
    embeddings = _embedding_sites(index, config, bits)
    weights: dict[str, WeightSite] = {w.tensor: w for w in embeddings}
    layers = [n for n in nodes if n.op_type == "MatMul" and len(index.initializers[n.input[1]].dims) == 2]
    bits.check_names([n.name for n in layers] + [w.node for w in embeddings], [n.name for n in index.graph.node])
    for node in layers:
        if node.input[1] not in weights:
            weights[node.input[1]] = WeightSite(node.input[1], node.name, node.op_type, 0, bits.bits(node.name)[0], config.block_size)
    if not weights:
        refuse_quantized(index.graph)
        raise ModelError("weight-only quantization found no linear layer (MatMul, or Gemm with transA=0 and alpha=1) with a constant 2-D weight: drop --weight-only or check the model")
    return QuantPlan(weights=tuple(weights.values()), activations=(), biases=(), reads=reading_order(index, weights))


def build_plan(model: onnx.ModelProto, config: QuantConfig) -> QuantPlan:
    """The sites of a normalized model, at the widths of ``config.bits_policy``; ModelError when
    nothing can be quantized or a weight to quantize is not finite or can be overridden,
    ConfigError when the policy names a node the model does not have."""
    bits = config.bits_policy
    index = GraphIndex(model.graph)
    warn_unused_exclusions(model.graph, config)
    warn_subgraph_layers(model.graph, config)
    nodes = _compute_nodes(index, config)
    if config.weight_only:
        return check_weights(index, _weight_only_plan(index, nodes, config, bits))
    attention = _attention_nodes(index, config) if config.quantize_attention else []
    embeddings = _embedding_sites(index, config, bits)
    if not nodes and not attention and not embeddings:
        refuse_quantized(model.graph)
        raise ModelError(
            f"nothing to quantize: no {'/'.join(config.op_types)} node with a constant float weight "
            "outside the excluded ones; check --exclude or the model"
        )
    bits.check_names([n.name for n in nodes + attention] + [w.node for w in embeddings], [n.name for n in model.graph.node])
    edges = bits.edges([n.name for n in nodes])
    weights: dict[str, WeightSite] = {}
    acts: dict[str, ActivationSite] = {}
    biases: list[BiasSite] = []
    for node in nodes:
        wbits, abits = bits.bits(node.name, node.name in edges)
        wname = node.input[1]
        if wname not in weights:
            axis = _weight_axis(node, index.initializers[wname].dims.__len__(), config.per_channel)
            weights[wname] = WeightSite(wname, node.name, node.op_type, axis, wbits)
        _add_activation(acts, node.input[0], abits, "input")
        if fuses_to_integer(wbits, abits) and node.op_type in REQUANTIZED_OUTPUT_OPS:
            fused = _fused_output(index, node)
            if fused is not None:
                _add_activation(acts, fused, abits, "output")
        bias = node.input[2] if len(node.input) > 2 and node.op_type in BIAS_OPS else ""
        if bias and index.constant(bias) is not None and len(index.consumers[bias]) == 1 and index.constant(bias).ndim == 1:
            attrs = {a.name: a.i for a in node.attribute if a.name in ("group", "transB")}
            biases.append(BiasSite(bias, node.name, node.input[0], wname, node.op_type, attrs.get("group", 1), bool(attrs.get("transB", 0))))
    for node in attention:
        for name in node.input:
            _add_activation(acts, name, bits.bits(node.name)[1], "input")
    consumer_weight_bits: dict[str, list[int]] = {}
    for node in nodes:
        consumer_weight_bits.setdefault(node.input[0], []).append(weights[node.input[1]].bits)
    grouped, aliases = group_sites(index, acts)
    acts = mark_wide(index, grouped, consumer_weight_bits)
    biases = [replace(b, scale_tensor=aliases[b.input_tensor]) if b.input_tensor in aliases else b for b in biases]
    order = {name: i for i, name in enumerate(tensor_order(index))}
    for site in embeddings:
        weights.setdefault(site.tensor, site)
    return check_weights(index, QuantPlan(
        weights=tuple(weights.values()),
        activations=tuple(sorted(acts.values(), key=lambda a: order.get(a.tensor, -1))),
        biases=tuple(biases),
        reads=reading_order(index, [*acts, *weights]),
        ceilings=clip_ceilings(index, acts.values()),
    ))


def _add_activation(acts: dict[str, ActivationSite], tensor: str, bits: int, role: str) -> None:
    """Input roles take precedence: a tensor's bits are those of the ops that consume it."""
    old = acts.get(tensor)
    if old is not None and old.role != role:
        if role == "output":
            return
    elif old is not None:
        bits = max(bits, old.bits)
    acts[tensor] = ActivationSite(tensor, bits, role, tensor)

