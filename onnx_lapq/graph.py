"""Load and normalize a float ONNX model; the only module that speaks onnx-graphsurgeon.

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
Shape inference and opset conversion see the model's skeleton (largemodel.split_large), its
large initializers stubs: they read no large constant, and copying the weights to and from
bytes for them would cost more than they do (and is impossible over protobuf's 2 GB limit).
The input ModelProto is never modified.  (File reading and writing live in modelio.)
"""
from __future__ import annotations

import gc
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, inliner, version_converter

from .errors import ModelError
from .largemodel import copy_model, fill_stubs, refuse_oversized_tensors, split_large
from .ops import output_channel_axis

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
    model, defaults = _detach_initializers(_convert_opset(_inline_functions(model), min_opset), overridable)
    graph = gs.import_onnx(model)  # reads the model; its export copies what it keeps
    _name_nodes(graph)
    try:
        graph.fold_constants()
    except Exception as exc:  # folding is an optimization; the model stays valid without it
        log.warning("constant folding failed (%s); continuing without it", exc)
    graph.cleanup().toposort()
    guessed = _fill_shapes(graph, _inferred(model))
    _fold_batchnorm(graph)
    _fold_conv_bias_add(graph)
    if linear_as == "MatMul":
        _unfold_gemm(graph)
    elif linear_as == "Gemm":
        _fold_matmul_bias_add(graph)
    for tensor, dtype in guessed:  # the export infers shapes again, on the graph as it is now
        tensor.shape, tensor.dtype = None, dtype
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.graph.initializer.extend(defaults)
    out.ir_version = min(max(model.ir_version, _IR_FOR_OPSET[default_opset(out)]), MAX_IR)
    out.producer_name = model.producer_name
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    del graph, model
    gc.collect()  # onnx-graphsurgeon's graphs are cyclic: free now the converted copy this one read
    return _infer_shapes(out)


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


def _convert_opset(model: onnx.ModelProto, min_opset: int) -> onnx.ModelProto:
    """``model`` at ``min_opset`` or later: a converted copy, or ``model`` itself."""
    current = default_opset(model)
    if current > MAX_OPSET:
        raise ModelError(f"opset {current} is newer than onnx_lapq supports ({MAX_OPSET}): re-export the model at opset {MAX_OPSET} or lower")
    if current >= min_opset:
        return model
    skeleton, stubs = split_large(model)
    try:
        converted = version_converter.convert_version(skeleton, min_opset)
    except Exception as exc:
        raise ModelError(f"cannot convert opset {current} to {min_opset} ({exc}): re-export the model at opset {min_opset} or newer") from None
    fill_stubs(converted, [tensor for _, tensor in stubs])
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


def _sole_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    return tensor.outputs[0]


def _fold_batchnorm(graph: gs.Graph) -> None:
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


def _fold_matmul_bias_add(graph: gs.Graph) -> None:
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


def _unfold_gemm(graph: gs.Graph) -> None:
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


def _fold_conv_bias_add(graph: gs.Graph) -> None:
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
