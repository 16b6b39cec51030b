"""Producers, consumers and constants of an ONNX graph, looked up by tensor name, and the
subgraphs a node holds."""
from __future__ import annotations

import onnx
from onnx import numpy_helper


def consumer_map(nodes) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in the order given."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


class GraphIndex:
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


def subgraphs(node: onnx.NodeProto):
    """The graphs that ``node``'s attributes hold (Loop and Scan bodies, If branches)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs
