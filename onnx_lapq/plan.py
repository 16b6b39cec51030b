"""Where Q/DQ goes: the quantization sites of a normalized graph (no numbers, only places).

Sites:
  * weight:     the constant weight of each Conv/ConvTranspose/Gemm/MatMul that is not
                excluded; per-channel on the output-channel axis (Conv 0, ConvTranspose 1,
                Gemm 0 if transB else 1, 2-D MatMul 1), per-tensor on request.
  * activation: every non-constant float input of those ops ("input" role, the LAPQ
                sites).  When a Conv/ConvTranspose/Gemm runs at 8/8 bits its output is
                quantized too ("output" role), after a sole-consumer Relu or Clip(min >= 0)
                where there is one, so that ONNX Runtime fuses DQ -> op -> Q into integer
                kernels; graph outputs stay float.  MatMul outputs stay float: ONNX Runtime
                runs DQ -> MatMul as an integer MatMul with a float output
                (MatMulIntegerToFloat), and requantizing there costs transformers accuracy
                (STS-B 79.7 against 81.5 for all-MiniLM-L6-v2 at W8A8).  Sub-8-bit activations have no CPU kernels to
                fuse into, so they get only the input sites.
  * bias:       the float bias of Conv/Gemm with a quantized input, exported as int32 with
                scale s_in * s_w and zero point 0.
With quantize_attention, MatMuls of two activations get input sites on both sides.
With weight_only, the plan is the blockwise weights of 2-D MatMuls alone.
Refused (ModelError): a weight or bias to quantize that holds NaN or Inf, or that is an
initializer a caller may override (a graph input: quantizing would freeze it), and a
model with nothing to quantize (named as already quantized when it holds Q/DQ or
integer-kernel ops).  Layers inside Loop/If/Scan subgraphs stay float, with a warning.
Activation sites share one parameter group when ONNX Runtime needs equal scales: the
output of a value-preserving op (MaxPool, Reshape, Flatten, Transpose, ...) with its
input, and Concat with its inputs.  At other than 8 bits such an output site is dropped
instead (its values are already on the input's grid), which keeps ONNX Runtime from
rewriting a 4-bit DQ -> MaxPool -> Q pair into a MaxPool on 4-bit integers.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from .config import QuantConfig
from .errors import ModelError

log = logging.getLogger(__name__)

PASS_THROUGH_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout")
# ONNX Runtime's QDQ propagation moves Q/DQ across these ops and then runs them on the
# integers, for which it has no 4-bit kernels, and its Clip+QuantizeLinear fusion rejects
# a 4-bit zero point: a sub-8-bit site next to one stores its codes in an 8-bit container
# (same grid, same numbers) so the model loads at ENABLE_ALL.
WIDE_CONTAINER_OPS = PASS_THROUGH_OPS + ("Slice", "Gather", "Resize", "Expand", "Split", "Tile", "DepthToSpace", "SpaceToDepth", "Clip")
FUSABLE_ACTIVATIONS = ("Relu", "Clip")
# ops that only a quantized model holds: ONNX's Q/DQ pair and ONNX Runtime's integer kernels
QUANTIZED_OPS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "GatherBlockQuantized", "QAttention",
)


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
        of its Clips; None where none does).  At 8 bits, a clip above it keeps ONNX Runtime
        from dropping the Clip into its QuantizeLinear, which leaves the layer unfused
        (mobilenet_v1_0.25's Relu6 layers)."""
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


def consumer_map(nodes) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in the order given."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


class _GraphIndex:
    """Producers, consumers and constants of a GraphProto."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = consumer_map(graph.node)
        self.graph_outputs = {o.name for o in graph.output}
        self.float_tensors = self._float_tensors()

    def _float_tensors(self) -> set[str]:
        infos = list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output)
        return {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}

    def is_float_activation(self, name: str) -> bool:
        return bool(name) and name not in self.initializers and name in self.float_tensors

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.graph_outputs else None

    def constant(self, name: str):
        return numpy_helper.to_array(self.initializers[name]) if name in self.initializers else None


def output_channel_axis(op_type: str, weight_ndim: int, trans_b: bool = False) -> int | None:
    """The axis of a layer's weight that indexes its output channels (None: no single one)."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return 1 if weight_ndim == 2 else None


def _weight_axis(node: onnx.NodeProto, weight_ndim: int, per_channel: bool) -> int | None:
    trans_b = bool(next((a.i for a in node.attribute if a.name == "transB"), 0))
    return output_channel_axis(node.op_type, weight_ndim, trans_b) if per_channel else None


def _compute_nodes(index: _GraphIndex, config: QuantConfig) -> list[onnx.NodeProto]:
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


def _fused_output(index: _GraphIndex, node: onnx.NodeProto) -> str | None:
    out = node.output[0]
    follower = index.sole_consumer(out)
    if follower is not None and follower.op_type in FUSABLE_ACTIVATIONS:
        low = index.constant(follower.input[1]) if follower.op_type == "Clip" and len(follower.input) > 1 else 0.0
        if low is not None and float(low) >= 0.0:
            out = follower.output[0]
    return None if out in index.graph_outputs else out


def _attention_nodes(index: _GraphIndex, config: QuantConfig) -> list[onnx.NodeProto]:
    """MatMuls of two float activations (attention scores and context)."""
    return [
        n for n in index.graph.node
        if n.op_type == "MatMul" and "MatMul" in config.op_types and not config.excludes_node(n.name, n.op_type)
        and all(index.is_float_activation(i) for i in n.input)
    ]


def _embedding_sites(index: _GraphIndex, config: QuantConfig) -> list[WeightSite]:
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
        sites[table] = WeightSite(table, node.name, node.op_type, axis if config.per_channel or block else None, config.weight_bits, block)
    return list(sites.values())


def _weight_only_plan(index: _GraphIndex, nodes: list[onnx.NodeProto], config: QuantConfig) -> QuantPlan:
    """Blockwise weights of 2-D MatMuls alone, blocks along K (axis 0): ONNX Runtime's MatMulNBits form."""
    weights: dict[str, WeightSite] = {w.tensor: w for w in _embedding_sites(index, config)}
    for node in nodes:
        if node.op_type == "MatMul" and len(index.initializers[node.input[1]].dims) == 2 and node.input[1] not in weights:
            weights[node.input[1]] = WeightSite(node.input[1], node.name, node.op_type, 0, config.weight_bits, config.block_size)
    if not weights:
        _refuse_quantized(index.graph)
        raise ModelError("weight-only quantization found no linear layer (MatMul, or Gemm with transA=0 and alpha=1) with a constant 2-D weight: drop --weight-only or check the model")
    return QuantPlan(weights=tuple(weights.values()), activations=(), biases=(), reads=_reading_order(index, weights))


def _warn_unused_exclusions(graph: onnx.GraphProto, config: QuantConfig) -> None:
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


def _refuse_quantized(graph: onnx.GraphProto) -> None:
    """ModelError when ``graph`` holds ops only a quantized model has."""
    found = sorted({n.op_type for n in graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})
    if found:
        raise ModelError(f"the model is already quantized (it has {', '.join(found)} nodes): give onnx_lapq the float model it was made from")


def subgraphs(node: onnx.NodeProto):
    """The graphs that ``node``'s attributes hold (Loop and Scan bodies, If branches)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _nested_layers(node: onnx.NodeProto, op_types) -> int:
    """How many nodes of ``op_types`` the subgraphs of ``node`` hold, at any depth."""
    inner = [n for g in subgraphs(node) for n in g.node]
    return sum(n.op_type in op_types for n in inner) + sum(_nested_layers(n, op_types) for n in inner)


def _warn_subgraph_layers(graph: onnx.GraphProto, config: QuantConfig) -> None:
    """A warning for each Loop/If/Scan node whose subgraphs hold layers: they stay float."""
    for node in graph.node:
        layers = _nested_layers(node, config.op_types)
        if layers:
            log.warning(
                "%d %s layer%s inside the subgraphs of %s node %r stay%s float: onnx_lapq quantizes the main graph only",
                layers, "/".join(config.op_types), "" if layers == 1 else "s", node.op_type, node.name, "s" if layers == 1 else "",
            )


def _check_weights(index: _GraphIndex, plan: QuantPlan) -> QuantPlan:
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
        bad = {"NaN": int(np.isnan(values).sum()), "Inf": int(np.isinf(values).sum())}
        if any(bad.values()):
            found = " and ".join(f"{n} {what}" for what, n in bad.items() if n)
            raise ModelError(
                f"{kind} {tensor!r} of node {node!r} holds {found} of {values.size} values, which quantization cannot "
                f"represent: fix the model's weights (a trained model has finite ones) or keep the layer float with --exclude {node}"
            )
    return plan


def build_plan(model: onnx.ModelProto, config: QuantConfig) -> QuantPlan:
    """The sites of a normalized model; ModelError when nothing can be quantized or a
    weight to quantize is not finite or can be overridden."""
    index = _GraphIndex(model.graph)
    _warn_unused_exclusions(model.graph, config)
    _warn_subgraph_layers(model.graph, config)
    nodes = _compute_nodes(index, config)
    if config.weight_only:
        return _check_weights(index, _weight_only_plan(index, nodes, config))
    attention = _attention_nodes(index, config) if config.quantize_attention else []
    if not nodes and not attention and not _embedding_sites(index, config):
        _refuse_quantized(model.graph)
        raise ModelError(
            f"nothing to quantize: no {'/'.join(config.op_types)} node with a constant float weight "
            "outside the excluded ones; check --exclude or the model"
        )
    edge = {nodes[0].name, nodes[-1].name} if config.keep_first_last_8bit and nodes else set()
    weights: dict[str, WeightSite] = {}
    acts: dict[str, ActivationSite] = {}
    biases: list[BiasSite] = []
    for node in nodes:
        wbits, abits = (8, 8) if node.name in edge else (config.weight_bits, config.act_bits)
        wname = node.input[1]
        if wname not in weights:
            axis = _weight_axis(node, index.initializers[wname].dims.__len__(), config.per_channel)
            weights[wname] = WeightSite(wname, node.name, node.op_type, axis, wbits)
        _add_activation(acts, node.input[0], abits, "input")
        if wbits == 8 and abits == 8 and node.op_type != "MatMul":
            fused = _fused_output(index, node)
            if fused is not None:
                _add_activation(acts, fused, 8, "output")
        bias = node.input[2] if len(node.input) > 2 and node.op_type in ("Conv", "Gemm") else ""
        if bias and index.constant(bias) is not None and len(index.consumers[bias]) == 1 and index.constant(bias).ndim == 1:
            attrs = {a.name: a.i for a in node.attribute if a.name in ("group", "transB")}
            biases.append(BiasSite(bias, node.name, node.input[0], wname, node.op_type, attrs.get("group", 1), bool(attrs.get("transB", 0))))
    for node in attention:
        for name in node.input:
            _add_activation(acts, name, config.act_bits, "input")
    consumer_weight_bits: dict[str, list[int]] = {}
    for node in nodes:
        consumer_weight_bits.setdefault(node.input[0], []).append(weights[node.input[1]].bits)
    grouped, aliases = _group_sites(index, acts)
    acts = _mark_wide(index, grouped, consumer_weight_bits)
    biases = [replace(b, scale_tensor=aliases[b.input_tensor]) if b.input_tensor in aliases else b for b in biases]
    order = {name: i for i, name in enumerate(_tensor_order(index))}
    for site in _embedding_sites(index, config):
        weights.setdefault(site.tensor, site)
    return _check_weights(index, QuantPlan(
        weights=tuple(weights.values()),
        activations=tuple(sorted(acts.values(), key=lambda a: order.get(a.tensor, -1))),
        biases=tuple(biases),
        reads=_reading_order(index, [*acts, *weights]),
        ceilings=_clip_ceilings(index, acts.values()),
    ))


def _clip_ceilings(index: _GraphIndex, sites) -> tuple[tuple[str, float], ...]:
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


def _add_activation(acts: dict[str, ActivationSite], tensor: str, bits: int, role: str) -> None:
    """Input roles take precedence: a tensor's bits are those of the ops that consume it."""
    old = acts.get(tensor)
    if old is not None and old.role != role:
        if role == "output":
            return
    elif old is not None:
        bits = max(bits, old.bits)
    acts[tensor] = ActivationSite(tensor, bits, role, tensor)


def _reading_order(index: _GraphIndex, tensors) -> tuple[str, ...]:
    """``tensors`` by the first node that reads them; a layer's input before its weight."""
    first: dict[str, int] = {}
    for position, node in enumerate(index.graph.node):
        for name in node.input:
            first.setdefault(name, position)
    weights = set(index.initializers)
    return tuple(sorted(tensors, key=lambda t: (first.get(t, len(index.graph.node)), t in weights)))


def _tensor_order(index: _GraphIndex) -> list[str]:
    names = [i.name for i in index.graph.input]
    for node in index.graph.node:
        names.extend(node.output)
    return names


def _group_sites(index: _GraphIndex, acts: dict[str, ActivationSite]) -> tuple[dict[str, ActivationSite], dict[str, str]]:
    """Tie sites that ONNX Runtime wants on one scale; drop pass-through outputs at other
    than 8 bits.  Also returns the dropped tensors -> the site whose grid they are on."""
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
            if src.bits == dst.bits == 8:
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
    return {name: ActivationSite(s.tensor, s.bits, s.role, find(name)) for name, s in acts.items()}, aliases


def _mark_wide(index: _GraphIndex, acts: dict[str, ActivationSite], consumer_weight_bits: dict[str, list[int]]) -> dict[str, ActivationSite]:
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
        out[name] = ActivationSite(site.tensor, site.bits, site.role, site.group, wide)
    return out


def carried_in_bytes(model: onnx.ModelProto, plan: QuantPlan) -> QuantPlan:
    """``plan`` with its sub-8-bit activation sites that only convolutions read stored in
    8-bit containers (``wide``: a Clip to the grid, then an 8-bit QuantizeLinear), for the
    loss evaluator's graphs only; the exported model keeps its 4-bit types.

    The values are the same bit for bit: the Clip stops the 8-bit code where the 4-bit one
    saturates.  ONNX Runtime's 4-bit QuantizeLinear and DequantizeLinear are several times
    slower than its 8-bit ones (one 64x32x56x56 pair: 34 ms against 8.5 ms with the Clip).
    Only convolution inputs: in an 8-bit container ONNX Runtime fuses a Gemm or MatMul with
    its DequantizeLinear inputs into an integer kernel even when the numbers are fed, which
    the exported 4-bit graph never gets (all-MiniLM-L6-v2 W4A4: exported loss 0.11% above the
    search's); a fed convolution's weight arrives as floats, so nothing fuses there."""
    consumers = _GraphIndex(model.graph).consumers

    def conv_only(tensor: str) -> bool:
        readers = {n.op_type for n in consumers.get(tensor, [])}
        return bool(readers) and readers <= {"Conv", "ConvTranspose"}

    activations = tuple(replace(a, wide=True) if a.bits < 8 and conv_only(a.tensor) else a for a in plan.activations)
    return replace(plan, activations=activations)


def _redirect(parent: dict[str, str], removed: str, target: str) -> None:
    for name, p in parent.items():
        if p == removed:
            parent[name] = target
