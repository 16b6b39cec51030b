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
"""
from __future__ import annotations

import heapq
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .params import QParams
from .plan import QuantPlan
from .qmath import QFormat, quantize

log = logging.getLogger(__name__)

_CONTAINERS = {
    (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16,
    (32, True): TensorProto.INT32,
}


def container(fmt: QFormat, wide: bool = False) -> int:
    """The ONNX integer type that stores codes of ``fmt``: its own width for 4, 8, 16 and
    32 bits, else (or when ``wide``) an 8-bit integer."""
    bits = fmt.bits if fmt.bits in (4, 8, 16, 32) and not (wide and fmt.bits < 8) else 8
    return _CONTAINERS[(bits, fmt.signed)]


def _int_tensor(name: str, values: np.ndarray, fmt: QFormat, wide: bool = False) -> TensorProto:
    dtype = container(fmt, wide)
    values = np.asarray(values, np.int64)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, values.shape, values.ravel().tolist())
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    return numpy_helper.from_array(values.astype(np_type), name)


def _float_tensor(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def _dq_node(prefix: str, source: str, qp: QParams) -> onnx.NodeProto:
    axis = {"axis": qp.axis} if qp.axis is not None and np.ndim(qp.scale) == 1 else {}
    return helper.make_node(
        "DequantizeLinear", [source, f"{prefix}_scale", f"{prefix}_zero_point"],
        [f"{prefix}_DequantizeLinear_Output"], name=f"{prefix}_DequantizeLinear", **axis,
    )


def export_qdq(model: onnx.ModelProto, plan: QuantPlan, params: dict[str, QParams]) -> onnx.ModelProto:
    """A new QDQ ModelProto: ``model`` with ``params`` baked in (``model`` is untouched)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    new_inits: list[TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    dropped: set[str] = set()

    constant_sites = [w.tensor for w in plan.weights] + [b.tensor for b in plan.biases]
    for name in constant_sites:
        qp = params[name]
        values = numpy_helper.to_array(inits[name])
        codes = quantize(values, qp.scale, qp.zero_point, qp.fmt, qp.axis)
        if qp.fmt.bits == 32 and np.any(np.abs(np.rint(values / _axis_view(qp.scale, values.ndim, qp.axis))) > 2**31 - 1):
            log.warning("bias %s overflows int32 at scale s_in*s_w; it stays float", name)
            continue
        new_inits += [
            _int_tensor(f"{name}_quantized", codes, qp.fmt),
            _float_tensor(f"{name}_scale", qp.scale),
            _int_tensor(f"{name}_zero_point", qp.zero_point, qp.fmt),
        ]
        new_nodes.append(_dq_node(name, f"{name}_quantized", qp))
        rename[name] = f"{name}_DequantizeLinear_Output"
        dropped.add(name)

    for site in plan.activations:
        qp, t = params[site.tensor], site.tensor
        source = t
        if qp.fmt.bits < 8 and container(qp.fmt, site.wide) in (TensorProto.INT8, TensorProto.UINT8):
            lo = (qp.fmt.qmin - int(qp.zero_point)) * float(qp.scale)
            hi = (qp.fmt.qmax - int(qp.zero_point)) * float(qp.scale)
            new_inits += [_float_tensor(f"{t}_clip_min", lo), _float_tensor(f"{t}_clip_max", hi)]
            new_nodes.append(helper.make_node("Clip", [t, f"{t}_clip_min", f"{t}_clip_max"], [f"{t}_Clip_Output"], name=f"{t}_Clip"))
            source = f"{t}_Clip_Output"
        new_inits += [_float_tensor(f"{t}_scale", qp.scale), _int_tensor(f"{t}_zero_point", qp.zero_point, qp.fmt, site.wide)]
        new_nodes.append(helper.make_node(
            "QuantizeLinear", [source, f"{t}_scale", f"{t}_zero_point"], [f"{t}_QuantizeLinear_Output"], name=f"{t}_QuantizeLinear",
        ))
        new_nodes.append(_dq_node(t, f"{t}_QuantizeLinear_Output", qp))
        rename[t] = f"{t}_DequantizeLinear_Output"

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    nodes = list(graph.node) + new_nodes
    del graph.node[:]
    graph.node.extend(toposort(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    return out


def _axis_view(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or np.ndim(scale) == 0:
        return np.asarray(scale, np.float64)
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(scale, np.float64).reshape(shape)


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in dependency order; among ready nodes the earliest in ``nodes`` goes first."""
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
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order
