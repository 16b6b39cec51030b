"""Bake quantization parameters into an integer-ready QDQ ModelProto.

For each weight site the float initializer becomes an integer initializer
``<w>_quantized`` (int8/uint8, INT4/UINT4, int16/uint16) with ``<w>_scale`` and
``<w>_zero_point`` feeding ``<w>_DequantizeLinear``; biases become int32 with scale
s_in * s_w.  Each activation site ``t`` gets ``t -> <t>_QuantizeLinear ->
<t>_DequantizeLinear`` with constant scalar scale and zero point, and every consumer
of ``t`` reads ``<t>_DequantizeLinear_Output`` (ONNX Runtime's own names, so its QDQ
debugging tools work on our output).  Grids narrower than their container (2, 3, 5,
6, 7 bits in 8-bit integers) get a ``<t>_Clip`` before the QuantizeLinear that
restricts the range to the grid; weights are already on their grid.  Sub-8-bit
activation sites marked ``wide`` by the plan are stored the same way.

A "fed" export keeps the same graph but takes every Q/DQ number as a graph input
(4-bit weights already dequantized: see :func:`qdq_tensors`): the loss evaluator's
one session for all candidate parameters.
"""
from __future__ import annotations

import heapq
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graphindex import consumer_map
from .largemodel import copy_model
from .params import QParams
from .plan import QuantPlan
from .solution import Solution
from .qmath import QFormat, broadcast, fake_quantize, quantize

log = logging.getLogger(__name__)

_CONTAINERS = {
    (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16,
    (32, True): TensorProto.INT32,
}
FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)  # ONNX's packed 4-bit types


def container(fmt: QFormat, wide: bool = False) -> int:
    """The ONNX integer type that stores codes of ``fmt``: its own width for 4, 8, 16 and
    32 bits, else (or when ``wide``) an 8-bit integer."""
    bits = fmt.bits if fmt.bits in (4, 8, 16, 32) and not (wide and fmt.bits < 8) else 8
    return _CONTAINERS[(bits, fmt.signed)]


def proto(name: str, value: np.ndarray, dtype: int) -> TensorProto:
    """An initializer of ONNX type ``dtype`` holding ``value``; 4-bit values are packed two
    to a byte, low nibble first, in raw_data (ONNX's layout)."""
    if dtype in FOUR_BIT:
        nibbles = np.asarray(value).astype(np.uint8).ravel() & 0xF  # two's complement: the low nibble of a negative code
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return helper.make_tensor(name, dtype, value.shape, packed.tobytes(), raw=True)
    return numpy_helper.from_array(value, name)


def _numpy_type(dtype: int) -> type:
    """The numpy type that holds codes of an ONNX integer type (4-bit ones in 8-bit integers)."""
    return {TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}.get(dtype) or helper.tensor_dtype_to_np_dtype(dtype)


def _code_range(dtype: int) -> tuple[int, int]:
    """Smallest and largest code of an ONNX integer type."""
    if dtype in FOUR_BIT:
        return (-8, 7) if dtype == TensorProto.INT4 else (0, 15)
    info = np.iinfo(_numpy_type(dtype))
    return int(info.min), int(info.max)


def _entry(value, fmt: QFormat | None, wide: bool = False) -> tuple[np.ndarray, int]:
    """(array, ONNX type): float32 when ``fmt`` is None, else codes in ``fmt``'s container."""
    if fmt is None:
        return np.asarray(value, np.float32), TensorProto.FLOAT
    dtype = container(fmt, wide)
    return np.asarray(value).astype(_numpy_type(dtype)), dtype


def _dq_node(prefix: str, source: str, qp: QParams) -> onnx.NodeProto:
    axis = {"axis": qp.axis} if qp.axis is not None and np.ndim(qp.scale) >= 1 else {}
    if qp.block_size is not None:
        axis["block_size"] = qp.block_size
    return helper.make_node(
        "DequantizeLinear", [source, f"{prefix}_scale", f"{prefix}_zero_point"],
        [f"{prefix}_DequantizeLinear_Output"], name=f"{prefix}_DequantizeLinear", **axis,
    )


def _clipped(site, qp: QParams) -> bool:
    """Whether the site's QuantizeLinear gets a Clip: grids narrower than their container,
    such as 3-bit codes in int8 or symmetric -127..127 in int8."""
    return (qp.fmt.qmin, qp.fmt.qmax) != _code_range(container(qp.fmt, _wide(site, qp)))


def _wide(site, qp: QParams) -> bool:
    """Whether an activation site's codes go in an 8-bit container: the plan's wide sites, and
    4-bit grids narrower than their 4-bit type (symmetric -7..7), whose Clip before a 4-bit
    QuantizeLinear ONNX Runtime's Clip/QuantizeLinear fusion refuses to load."""
    return site.wide or (container(qp.fmt) in FOUR_BIT and (qp.fmt.qmin, qp.fmt.qmax) != _code_range(container(qp.fmt)))


def qdq_tensors(
    solution: Solution,
    plan: QuantPlan,
    params: dict[str, QParams],
    *,
    fed: bool = False,
    sites: set[str] | None = None,
    any_widths: bool = False,
) -> dict[str, tuple[np.ndarray, int]]:
    """The numbers of a QDQ model by tensor name: (array, ONNX type).

    The float values of weights and biases come from ``solution`` (masked weights,
    corrected biases: :meth:`Solution.values`).  ``fed`` gives the numbers as a
    model whose Q/DQ tensors are graph inputs takes them: weight codes in 8-bit (or
    16/32-bit) containers, except 4-bit weights, which come dequantized (float32
    ``<w>_DequantizeLinear_Output``, bit for bit what DequantizeLinear makes of their codes:
    an 8-bit container would let ONNX Runtime fuse a Gemm or MatMul into an integer kernel
    that the exported INT4 weight never gets); activation zero points in their own type (4-bit ones are fed as
    OrtValues), so that ONNX Runtime fuses the fed graph's layers as it fuses the exported
    graph's.
    A bias that overflows int32 saturates (params.py widens weight scales so that
    biases fit, with room for bias correction).
    ``sites`` limits the result to the tensors of those sites.  ``any_widths`` (with ``fed``)
    gives every weight dequantized, whatever its width, and every activation's codes in an
    8-bit container behind a Clip to its grid: one fed graph then takes weights and
    activations at any widths (sensitivity probes), its layers run in float.
    """
    floats = solution.values(plan, params, sites)
    weight_names = {w.tensor for w in plan.weights}
    any_width = fed and any_widths
    out: dict[str, tuple[np.ndarray, int]] = {}
    for name in [w.tensor for w in plan.weights] + [b.tensor for b in plan.biases]:
        if sites is not None and name not in sites:
            continue
        qp = params[name]
        values = floats[name]
        if qp.fmt.bits == 32 and not fed and np.any(np.abs(np.rint(values / broadcast(qp.scale, values.shape, qp.axis, None))) > qp.fmt.qmax):
            log.warning("bias %s overflows int32 at scale s_in*s_w; it saturates", name)
        if fed and name in weight_names and (any_width or container(qp.fmt) in FOUR_BIT):
            out[f"{name}_DequantizeLinear_Output"] = _entry(fake_quantize(values, qp.scale, qp.zero_point, qp.fmt, qp.axis, qp.block_size), None)
            continue
        codes = quantize(values, qp.scale, qp.zero_point, qp.fmt, qp.axis, qp.block_size)
        out[f"{name}_quantized"] = _entry(codes, qp.fmt, fed)
        out[f"{name}_scale"] = _entry(qp.scale, None)
        out[f"{name}_zero_point"] = _entry(qp.zero_point, qp.fmt, fed)
    for site in plan.activations:
        t, qp = site.tensor, params[site.tensor]
        if sites is not None and t not in sites:
            continue
        if any_width or _clipped(site, qp):
            out[f"{t}_clip_min"] = _entry((qp.fmt.qmin - int(qp.zero_point)) * float(qp.scale), None)
            out[f"{t}_clip_max"] = _entry((qp.fmt.qmax - int(qp.zero_point)) * float(qp.scale), None)
        out[f"{t}_scale"] = _entry(qp.scale, None)
        out[f"{t}_zero_point"] = _entry(qp.zero_point, qp.fmt, any_width or _wide(site, qp))
    return out


def export_qdq(
    model: onnx.ModelProto, plan: QuantPlan, params: dict[str, QParams], solution: Solution | None = None, *, fed: bool = False,
    any_widths: bool = False,
) -> onnx.ModelProto:
    """A new QDQ ModelProto: ``model`` with ``params`` and ``solution``'s values (default: the
    model's own weights and biases) baked in (``model`` is untouched).

    With ``fed`` the Q/DQ numbers (see :func:`qdq_tensors`) become graph inputs
    instead of initializers, so one ONNX Runtime session evaluates any parameters (and,
    with ``any_widths``, any weight and activation widths).
    """
    tensors = qdq_tensors(solution or Solution.of(model, plan), plan, params, fed=fed, any_widths=any_widths)
    new_nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    for name in [w.tensor for w in plan.weights] + [b.tensor for b in plan.biases]:
        if f"{name}_quantized" in tensors:
            new_nodes.append(_dq_node(name, f"{name}_quantized", params[name]))
        if f"{name}_quantized" in tensors or f"{name}_DequantizeLinear_Output" in tensors:
            rename[name] = f"{name}_DequantizeLinear_Output"
    for site in plan.activations:
        t = site.tensor
        source = t
        if f"{t}_clip_min" in tensors:
            new_nodes.append(helper.make_node("Clip", [t, f"{t}_clip_min", f"{t}_clip_max"], [f"{t}_Clip_Output"], name=f"{t}_Clip"))
            source = f"{t}_Clip_Output"
        new_nodes.append(helper.make_node(
            "QuantizeLinear", [source, f"{t}_scale", f"{t}_zero_point"], [f"{t}_QuantizeLinear_Output"], name=f"{t}_QuantizeLinear",
        ))
        new_nodes.append(_dq_node(t, f"{t}_QuantizeLinear_Output", params[t]))
        rename[t] = f"{t}_DequantizeLinear_Output"

    out = copy_model(model, without=rename)
    graph = out.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    if fed:
        graph.input.extend(helper.make_tensor_value_info(n, dtype, value.shape) for n, (value, dtype) in tensors.items())
    else:
        graph.initializer.extend(proto(n, value, dtype) for n, (value, dtype) in tensors.items())
    ordered = _order(list(graph.node), new_nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer})
    del graph.node[:]
    graph.node.extend(ordered)
    return out


def _order(original: list[onnx.NodeProto], added: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Topological order that puts each added Q/DQ node just before its first consumer,
    so that a parameter change touches only the graph from that consumer on."""
    rank = {id(n): 2 * i + 1 for i, n in enumerate(original)}
    consumers = consumer_map(original + added)
    for node in reversed(added):
        users = [rank[id(u)] for o in node.output for u in consumers.get(o, []) if id(u) in rank]
        rank[id(node)] = min(users) - 1 if users else 2 * len(original) + 1
    nodes = original + added
    return toposort(nodes, available, [rank[id(n)] for n in nodes])


def toposort(nodes: list[onnx.NodeProto], available: set[str], priority: list[float] | None = None) -> list[onnx.NodeProto]:
    """Nodes in dependency order; among ready nodes the lowest ``priority`` (default: the
    position in ``nodes``) goes first."""
    priority = priority or list(range(len(nodes)))
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {producer[x] for x in node.input if x and x not in available and x in producer}
        missing = [x for x in node.input if x and x not in available and x not in producer]
        if missing:
            raise ValueError(f"node {node.name!r} reads {missing[0]!r}, which nothing produces")
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [(priority[i], i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (priority[u], u))
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order
