"""Reduced-precision float models: quantize them in float32, keep their interface.

:func:`to_float32` makes a float32 copy of a float16 or bfloat16 (or mixed) model: every
float16/bfloat16 initializer, tensor attribute (Constant, ConstantOfShape), ``to`` of Cast
and ``dtype`` of the ops that make tensors, and every element type of the graph's
inputs, outputs and value_info (in subgraphs and local functions too) becomes float32.
Float16 and bfloat16 values are exactly representable in float32, so the copy computes the
same network, only without the intermediate roundings.  The :class:`Interface` it returns
remembers what the model's inputs and outputs were; :meth:`Interface.restore` gives a
float32 model (the quantized one) that interface back: each such graph input ``x`` keeps
its name and type and feeds a ``Cast`` to float32 (``x_float32``), an initializer that a
caller may override (one listed among the inputs) keeping its default value in that type,
and each such output ``y`` is a ``Cast`` of the float32 ``y_float32``, so the restored
model takes and returns exactly what the input model did, and runs in float32 between.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .data import InputSpec
from .errors import ModelError
from .graph import overridable_initializers
from .graphindex import subgraphs
from .largemodel import copy_model

REDUCED = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
_REDUCED_NUMPY = tuple(np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in REDUCED)
TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; the element type of RandomNormal, EyeLike, ...


@dataclass(frozen=True)
class Interface:
    """What :func:`to_float32` changed: the reduced float types the model used, and the
    ONNX element type of each graph input and output that it turned into float32."""

    float_types: tuple[str, ...] = ()
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)

    @property
    def float_type(self) -> str:
        """The model's float type as the report names it: "float32" for a float32 model."""
        return "+".join(self.float_types) or "float32"

    def narrow(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A float32 batch as the original model takes it (its inputs in their own type)."""
        return {k: v.astype(helper.tensor_dtype_to_np_dtype(self.inputs[k])) if k in self.inputs else v for k, v in batch.items()}

    def widen(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """The batches with the arrays of reduced-precision inputs in float32."""
        for batch in batches:
            yield {k: v.astype(np.float32) if k in self.inputs else v for k, v in batch.items()}

    def specs(self, specs: list[InputSpec]) -> list[InputSpec]:
        """The input specs of the float32 copy as the original model has them (the types it takes)."""
        return [replace(s, dtype=np.dtype(helper.tensor_dtype_to_np_dtype(self.inputs[s.name]))) if s.name in self.inputs else s for s in specs]

    def session(self, session: ort.InferenceSession) -> ort.InferenceSession | FeedSession:
        """``session`` of a restored model, made to take and return float32 arrays like the
        float32 copy's (itself when the interface is float32)."""
        return FeedSession(session, self) if self.inputs or self.outputs else session

    def restore(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of the float32 ``model`` with this interface (``model`` itself when there is
        nothing to restore)."""
        if not self.inputs and not self.outputs:
            return model
        out = copy_model(model)
        graph = out.graph
        taken = _names(graph)
        casts = []
        defaults = {t.name: t for t in graph.initializer}
        for value in graph.input:
            if value.name in self.inputs:
                inner = _rename_consumers(graph, value.name, _fresh(f"{value.name}_float32", taken))
                casts.append(helper.make_node("Cast", [value.name], [inner], name=_fresh(f"{value.name}_Cast", taken), to=TensorProto.FLOAT))
                value.type.tensor_type.elem_type = self.inputs[value.name]
                if value.name in defaults:  # an overridable initializer: its default value takes the input's type
                    _retype(defaults[value.name], self.inputs[value.name])
        nodes = casts + list(graph.node)
        producers = {o for n in graph.node for o in n.output}
        for value in graph.output:
            if value.name in self.outputs and value.name in producers:
                inner = _rename_consumers(graph, value.name, _fresh(f"{value.name}_float32", taken), producers=True)
                nodes.append(helper.make_node("Cast", [inner], [value.name], name=_fresh(f"{value.name}_Cast", taken), to=self.outputs[value.name]))
            if value.name in self.outputs:
                value.type.tensor_type.elem_type = self.outputs[value.name]
        del graph.node[:]
        graph.node.extend(nodes)
        return out


class FeedSession:
    """An ONNX Runtime session of a model with a reduced-precision interface, run with the
    float32 batches of its float32 copy: inputs are narrowed to the model's types, outputs
    widened to float32."""

    def __init__(self, session: ort.InferenceSession, interface: Interface):
        self._session = session
        self._interface = interface

    def run(self, names: list[str] | None, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self._session.run(names, self._interface.narrow(batch))
        return [np.asarray(o, np.float32) if o.dtype in _REDUCED_NUMPY else o for o in outputs]


def to_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Interface]:
    """A float32 copy of ``model`` and the interface it had (``model`` itself and an empty
    Interface when it holds no float16 or bfloat16 tensor)."""
    found: set[int] = set()
    _graph_types(model.graph, found, convert=False)
    for function in model.functions:
        _nodes(function.node, found, convert=False)
    if not found:
        return model, Interface()
    overridable = set(overridable_initializers(model))
    constants = {t.name for t in model.graph.initializer} - overridable
    interface = Interface(
        float_types=tuple(REDUCED[t] for t in sorted(found)),
        inputs={v.name: _elem(v.type) for v in model.graph.input if v.name not in constants and _elem(v.type) in REDUCED
                and (v.name not in overridable or _elem(v.type) == onnx.TensorProto.FLOAT16)},  # a bfloat16 default becomes float32
        outputs={v.name: _elem(v.type) for v in model.graph.output if _elem(v.type) in REDUCED},
    )
    _refuse_bfloat16_interface(interface)
    out = copy_model(model)
    _graph_types(out.graph, set(), convert=True)
    for function in out.functions:
        _nodes(function.node, set(), convert=True)
    return out, interface


def _refuse_bfloat16_interface(interface: Interface) -> None:
    """ModelError for a bfloat16 graph input or output: ONNX Runtime's Python API cannot feed
    or return them, so the exported model could not be checked."""
    names = [n for n, t in {**interface.inputs, **interface.outputs}.items() if t == TensorProto.BFLOAT16]
    if names:
        raise ModelError(
            f"the model's inputs or outputs {names} are bfloat16, which ONNX Runtime's Python API cannot feed or return: "
            "give the model float32 (or float16) inputs and outputs, with Casts to bfloat16 inside"
        )


def _elem(type_proto: onnx.TypeProto) -> int:
    return type_proto.tensor_type.elem_type if type_proto.HasField("tensor_type") else TensorProto.UNDEFINED


def _graph_types(graph: onnx.GraphProto, found: set[int], *, convert: bool) -> None:
    """Collect (and with ``convert`` replace by float32) the reduced float types of a graph."""
    for tensor in graph.initializer:
        _tensor(tensor, found, convert)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        _type(value.type, found, convert)
    _nodes(graph.node, found, convert=convert)


def _nodes(nodes: Iterable[onnx.NodeProto], found: set[int], *, convert: bool) -> None:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _tensor(attr.t, found, convert)
            elif attr.type == onnx.AttributeProto.TENSORS:
                for tensor in attr.tensors:
                    _tensor(tensor, found, convert)
            elif attr.type == onnx.AttributeProto.GRAPH:
                _graph_types(attr.g, found, convert=convert)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for graph in attr.graphs:
                    _graph_types(graph, found, convert=convert)
            elif attr.type == onnx.AttributeProto.INT and attr.name in TYPE_ATTRIBUTES and node.domain in ("", "ai.onnx") and attr.i in REDUCED:
                found.add(attr.i)
                if convert:
                    attr.i = TensorProto.FLOAT


def _tensor(tensor: onnx.TensorProto, found: set[int], convert: bool) -> None:
    if tensor.data_type not in REDUCED:
        return
    found.add(tensor.data_type)
    if convert:
        _retype(tensor, TensorProto.FLOAT)


def _retype(tensor: onnx.TensorProto, elem_type: int) -> None:
    """``tensor``'s values in ``elem_type`` (exact from float16 or bfloat16 to float32, and back for values that came from them)."""
    values = numpy_helper.to_array(tensor).astype(helper.tensor_dtype_to_np_dtype(elem_type))
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _type(type_proto: onnx.TypeProto, found: set[int], convert: bool) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" and type_proto.tensor_type.elem_type in REDUCED:
        found.add(type_proto.tensor_type.elem_type)
        if convert:
            type_proto.tensor_type.elem_type = TensorProto.FLOAT
    elif kind in ("sequence_type", "optional_type"):
        _type(getattr(type_proto, kind).elem_type, found, convert)


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer)}
    names.update(n.name for n in graph.node)
    names.update(t for n in graph.node for t in list(n.input) + list(n.output))
    return names


def _fresh(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _rename_consumers(graph: onnx.GraphProto, old: str, new: str, *, producers: bool = False) -> str:
    """``new``: every node input (in subgraphs too) and value_info named ``old`` is renamed
    to it, and with ``producers`` the output of the node that makes it."""
    for node in _all_nodes(graph):
        node.input[:] = [new if name == old else name for name in node.input]
    if producers:
        for node in graph.node:
            node.output[:] = [new if name == old else name for name in node.output]
    for value in graph.value_info:
        if value.name == old:
            value.name = new
    return new


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of ``graph`` and of its subgraphs (which may read the graph's tensors)."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _all_nodes(sub)
