"""Load and normalize a float ONNX model; with the layer rewrites it applies (layerfolds.py),
the only module that speaks onnx-graphsurgeon.

normalize(model) returns a new ModelProto that is numerically the same network with:
  * the default-domain opset raised to what the requested Q/DQ types need
    (13 for per-axis Q/DQ, 21 for 4-bit and 16-bit types) and an IR version that
    ONNX Runtime accepts;
  * constants folded and dead nodes removed, every node named, nodes in topological
    order;
  * BatchNormalization folded into a preceding Conv/ConvTranspose/Gemm, a constant
    per-channel Add after a bias-less Conv folded into the Conv's bias, and, with
    ``linear_as="Gemm"`` (the default), a 2-D MatMul with a constant weight followed by a
    constant per-column Add made one Gemm (which ONNX Runtime runs as an integer QGemm; it
    fuses the pair into a float Gemm itself otherwise).
With ``linear_as="MatMul"`` (weight-only quantization, whose 4-bit form is ONNX Runtime's
MatMulNBits) linear layers go the other way: MatMul + Add stays as it is and a Gemm with a
constant weight, transA=0 and alpha=1 becomes MatMul (its weight transposed where transB=1)
followed by an Add of beta * C.  With ``linear_as=None`` linear layers stay as they are.
Initializers that are also graph inputs stay both in models of IR version 4 or later, where
ONNX Runtime lets a caller override them: they are not folded into anything, and the graph
inputs keep their names, types and order.  (Under IR 3 every initializer had to be listed
as an input and ONNX Runtime treats them as constants, so they are constants here too.)
Shape inference, opset conversion and onnx-graphsurgeon see the model's skeleton
(largemodel.split_large), its large initializers stubs: the first two read no large constant,
and copying the weights to and from bytes for them would cost more than they do (and is
impossible over protobuf's 2 GB limit); the graph's constants made from stubs read the
model's own TensorProtos, and the normalized copy takes each one's data once.
The input ModelProto is never modified.  (File reading and writing live in modelio.)
"""
from __future__ import annotations

import gc
import logging

import onnx
import onnx_graphsurgeon as gs
from onnx import helper, inliner, version_converter

from .errors import ModelError
from .largemodel import copy_model, fill_stubs, is_large, refuse_oversized_tensors, split_large, stub_of
from .layerfolds import fold_batchnorm, fold_conv_bias_add, fold_matmul_bias_add, unfold_gemm

log = logging.getLogger(__name__)

MIN_OPSET = 13
INT4_OPSET = 21
MAX_OPSET = 23
MAX_IR = 11  # the newest IR version ONNX Runtime reads; onnx writes a newer one by default
# The lowest IR version that carries each opset (ONNX's own table), so that we never
# write a newer IR than ONNX Runtime reads.
_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelError("the model imports no default-domain opset: it is not a standard ONNX model")


def overridable_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers that ONNX Runtime lets a caller override: those listed among the graph
    inputs, in a model of IR version 4 or later."""
    if model.ir_version < 4:
        return []
    inputs = {i.name for i in model.graph.input}
    return [t.name for t in model.graph.initializer if t.name in inputs]


def normalize(model: onnx.ModelProto, *, min_opset: int = MIN_OPSET, linear_as: str | None = "Gemm") -> onnx.ModelProto:
    """The normalized copy of ``model`` described in the module docstring."""
    refuse_oversized_tensors(model)
    overridable = overridable_initializers(model)
    skeleton, stubs = split_large(_inline_functions(model))
    large = [tensor for _, tensor in stubs]  # read where the folds need them, copied once by the export
    model, defaults = _detach_initializers(_convert_opset(skeleton, min_opset), overridable)
    graph = gs.import_onnx(model)
    _attach(graph, large)
    _name_nodes(graph)
    try:
        graph.fold_constants()
    except Exception as exc:  # folding is an optimization; the model stays valid without it
        log.warning("constant folding failed (%s); continuing without it", exc)
    graph.cleanup().toposort()
    guessed = _fill_shapes(graph, _inferred(model))
    fold_batchnorm(graph)
    fold_conv_bias_add(graph)
    if linear_as == "MatMul":
        unfold_gemm(graph)
    elif linear_as == "Gemm":
        fold_matmul_bias_add(graph)
    for tensor, dtype in guessed:  # the export infers shapes again, on the graph as it is now
        tensor.shape, tensor.dtype = None, dtype
    graph.cleanup().toposort()
    out, exported = _export(graph)
    out.graph.initializer.extend(defaults)
    fill_stubs(out, large + exported)
    out.ir_version = min(max(model.ir_version, _IR_FOR_OPSET[default_opset(out)]), MAX_IR)
    out.producer_name = model.producer_name
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    del graph, model
    gc.collect()  # onnx-graphsurgeon's graphs are cyclic: free now the values its folds made
    return _infer_shapes(out)


def _export(graph: gs.Graph) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """``gs.export_onnx(graph)`` with its large constants as stubs, and the TensorProtos to
    fill them with.  The exporter would copy the data of each constant twice (into the
    graph, then the graph into the model); this way the caller copies it once."""
    originals = []
    for tensor in graph.tensors().values():
        values = _lazy(tensor)
        if values is not None and is_large(values.tensor):
            originals.append((tensor, values, values.tensor))
            values.tensor = stub_of(values.tensor)
    try:
        out = gs.export_onnx(graph)
    finally:
        for _, values, original in originals:
            values.tensor = original
    return out, [_named(original, tensor.name) for tensor, _, original in originals]


def _attach(graph: gs.Graph, tensors: list[onnx.TensorProto]) -> None:
    """Make the constants of ``graph`` imported from stubs read ``tensors`` (by name) instead."""
    by_name = {t.name: t for t in tensors}
    for name, tensor in graph.tensors().items():
        values = _lazy(tensor)
        if values is not None and name in by_name:
            values.tensor = by_name[name]
            tensor.data_location = by_name[name].data_location if by_name[name].HasField("data_location") else None


def _lazy(tensor) -> gs.ir.tensor.LazyValues | None:
    """A Constant's values where it still reads them from its TensorProto (onnx-graphsurgeon's
    ``_values``), else None (a variable, or values a fold made)."""
    values = getattr(tensor, "_values", None)
    return values if isinstance(values, gs.ir.tensor.LazyValues) else None


def _named(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """``tensor`` under ``name``: itself, or a renamed copy (data included) where the name differs."""
    if tensor.name == name:
        return tensor
    renamed = onnx.TensorProto()
    renamed.CopyFrom(tensor)
    renamed.name = name
    return renamed


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the types and shapes ONNX infers on its skeleton: its graph inputs,
    outputs and value_info replaced by the inferred ones."""
    inferred = _inferred(model)
    for field in ("input", "output", "value_info"):
        values = getattr(model.graph, field)
        del values[:]
        values.extend(getattr(inferred.graph, field))
    return model


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The skeleton of ``model`` with the types and shapes ONNX infers."""
    try:
        return onnx.shape_inference.infer_shapes(split_large(model)[0])
    except Exception as exc:
        raise ModelError(
            f"shape inference failed on the model ({exc}): check its file with onnx.checker.check_model(path, full_check=True)"
        ) from None


def _fill_shapes(graph: gs.Graph, inferred: onnx.ModelProto) -> list[tuple[gs.Variable, object]]:
    """The tensors of ``graph`` whose shape the model did not give, with the type they had,
    given their inferred shape and type (the folds read ranks, such as a MatMul's input made
    by a Reshape)."""
    guessed = []
    known = {v.name: v.type.tensor_type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    for name, tensor in graph.tensors().items():
        found = known.get(name)
        if isinstance(tensor, gs.Variable) and tensor.shape is None and found is not None and found.HasField("shape"):
            guessed.append((tensor, tensor.dtype))
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in found.shape.dim]
            if tensor.dtype is None and found.elem_type:
                tensor.dtype = helper.tensor_dtype_to_np_dtype(found.elem_type)
    return guessed


def _inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its local functions' bodies in place of their calls (the version
    converter cannot convert functions and drops them), or ``model`` itself without any."""
    if not model.functions:
        return model
    skeleton, stubs = split_large(model)
    try:
        inlined = inliner.inline_local_functions(skeleton, convert_version=True)
    except Exception as exc:
        raise ModelError(f"cannot inline the model's local functions ({exc}): export the model without local functions") from None
    fill_stubs(inlined, [tensor for _, tensor in stubs])
    return inlined


def _convert_opset(skeleton: onnx.ModelProto, min_opset: int) -> onnx.ModelProto:
    """A model's ``skeleton`` at ``min_opset`` or later: a converted copy (its stubs as they
    were), or ``skeleton`` itself."""
    current = default_opset(skeleton)
    if current > MAX_OPSET:
        raise ModelError(f"opset {current} is newer than onnx_lapq supports ({MAX_OPSET}): re-export the model at opset {MAX_OPSET} or lower")
    if current >= min_opset:
        return skeleton
    try:
        converted = version_converter.convert_version(skeleton, min_opset)
    except Exception as exc:
        raise ModelError(f"cannot convert opset {current} to {min_opset} ({exc}): re-export the model at opset {min_opset} or newer") from None
    converted.ir_version = max(converted.ir_version, _IR_FOR_OPSET[min_opset])
    return converted


def _detach_initializers(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of ``model`` without the initializers ``names``, and them (``model`` itself
    and none without ``names``): onnx-graphsurgeon then sees plain graph inputs, which it
    neither folds nor drops."""
    if not names:
        return model, []
    return copy_model(model, without=names), [t for t in model.graph.initializer if t.name in names]


def _name_nodes(graph: gs.Graph) -> None:
    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
