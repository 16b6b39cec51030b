"""Models over protobuf's 2 GB limit: their size, their skeletons, and copies that leave
their large data out.

Protobuf cannot serialize a model over 2 GB (PROTOBUF_LIMIT), and every tool that takes a
model as bytes (onnx's shape inference, version converter and inliner, ONNX Runtime)
inherits that limit; upb even sizes a message by serializing it.  :func:`over_protobuf_limit`
and :func:`model_size` tell the size from the initializers' data instead.
:func:`split_large` gives a model's skeleton, its large initializers replaced by stubs that
carry only name, type and dims, for those tools; :func:`fill_stubs` puts the data back;
:func:`temporary_model_file` writes a skeleton with its stubs' data in an external data
file, for ONNX Runtime to load from a path.  :func:`copy_model` copies a model, or all of
it but some initializers, which it never copies.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import onnx
from onnx import helper, numpy_helper

from .errors import ModelError

PROTOBUF_LIMIT = 2**31 - 1
TENSOR_LIMIT = PROTOBUF_LIMIT  # one tensor: what protobuf copies as one message
STUB_BYTES = 1 << 16  # initializers over this size are always stubs in a skeleton
DATA_ALIGNMENT = 4096  # external data offsets: a page, so that ONNX Runtime can map each tensor
# element types packed below a byte per element (those this onnx version knows)
_PACKED_BITS = {getattr(onnx.TensorProto, n): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, n)}


def copy_model(model: onnx.ModelProto, *, without: Collection[str] = ()) -> onnx.ModelProto:
    """A deep copy of ``model`` (edits and onnx.save never reach the original), less the
    graph initializers named in ``without`` (never copied: removing them from a copy would
    not give their memory back before the copy goes)."""
    if without:
        out = _bare(model)
        out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in without)
        return out
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def refuse_oversized_tensors(model: onnx.ModelProto) -> None:
    """ModelError naming an initializer whose data alone is over protobuf's limit: the graph
    tools copy each tensor as one message, which protobuf cannot serialize."""
    for tensor in model.graph.initializer:
        size = _stored_bytes(tensor)
        if size > TENSOR_LIMIT:
            raise ModelError(
                f"initializer {tensor.name!r} holds {size / 2**30:.2f} GiB, over the 2 GiB that protobuf can copy as one tensor, which "
                "onnx_lapq cannot handle yet: split it (e.g. an embedding table into row blocks joined by Concat) or quantize it with "
                "another tool"
            )


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """True when protobuf cannot serialize ``model`` in one piece.  Told without serializing
    it (which is what measuring it exactly costs): the rest of the model, its initializers'
    data, and a bound on each initializer's own fields (name, type, dims)."""
    fields = sum(len(t.name) + 11 * len(t.dims) + 40 for t in model.graph.initializer)  # tags, lengths, varints at their widest
    return _bare(model).ByteSize() + _data_bytes(model) + fields > PROTOBUF_LIMIT


def model_size(model: onnx.ModelProto) -> int:
    """The bytes of ``model`` serialized, told without serializing its initializers' data
    (upb sizes a message by serializing it, which also fails over protobuf's limit): the
    rest of the model, plus each initializer framed as protobuf frames it, its raw data's
    length from its type and dims."""
    bare = _bare(model)
    graph = bare.graph.ByteSize()
    full = graph + sum(_framed(_tensor_bytes(t)) for t in model.graph.initializer)
    return bare.ByteSize() - _framed(graph) + _framed(full)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    fields = onnx.TensorProto()
    _copy_fields(tensor, fields, skip="raw_data")
    return fields.ByteSize() + _framed(_stored_bytes(tensor))


def _framed(length: int) -> int:
    """Bytes of a length-delimited field of ``length`` bytes: a one-byte tag (graph,
    initializer and raw_data have field numbers below 16), the length as a varint, the bytes."""
    return 1 + max(1, -(-length.bit_length() // 7)) + length


def split_large(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, onnx.TensorProto]]]:
    """The skeleton of ``model`` and, for each of its stubs, (the stub, ``model``'s own initializer).

    The skeleton is a copy of ``model`` (made without copying the data it leaves out) in
    which every graph initializer over STUB_BYTES and, largest first, as many more as it
    takes to bring the skeleton under PROTOBUF_LIMIT are stubs: name, type and dims, with
    their data EXTERNAL and no location.  Shape inference and opset conversion read no
    large constant, so they give on a skeleton what they give on the model."""
    skeleton = _bare(model)
    sizes = [_stored_bytes(t) if _stubbable(t) else 0 for t in model.graph.initializer]
    remaining = skeleton.ByteSize() + sum(sizes)
    stubbed = set()
    for size, index in sorted(((size, i) for i, size in enumerate(sizes) if size), reverse=True):
        if size <= STUB_BYTES and remaining <= PROTOBUF_LIMIT:
            break
        stubbed.add(index)
        remaining -= size
    pairs = []
    for index, tensor in enumerate(model.graph.initializer):
        if index in stubbed:
            skeleton.graph.initializer.append(stub_of(tensor))
            pairs.append((skeleton.graph.initializer[-1], tensor))
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton, pairs


def stub_of(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A stub of ``tensor``: its name, type and dims, its data EXTERNAL with no location."""
    return onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, data_location=onnx.TensorProto.EXTERNAL)


def is_large(tensor: onnx.TensorProto) -> bool:
    """Whether a skeleton always has ``tensor`` as a stub (its data over STUB_BYTES)."""
    return _stubbable(tensor) and _stored_bytes(tensor) > STUB_BYTES


def fill_stubs(model: onnx.ModelProto, tensors: list[onnx.TensorProto]) -> None:
    """Put ``tensors`` in place of the stubs (see :func:`split_large`) of the same name in ``model``."""
    by_name = {t.name: t for t in tensors}
    for tensor in model.graph.initializer:
        if tensor.name in by_name and _is_stub(tensor):
            tensor.CopyFrom(by_name[tensor.name])


@contextmanager
def temporary_model_file(skeleton: onnx.ModelProto, stubs: list[tuple[onnx.TensorProto, onnx.TensorProto]]) -> Iterator[str]:
    """The path of a model written to a new temporary folder: ``skeleton`` and ``stubs`` as
    :func:`split_large` gives them (the skeleton maybe edited since), each stub pointing
    into one external data file beside it that holds its tensor's data; the folder is
    removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="onnx_lapq-") as folder:
        path = os.path.join(folder, "model.onnx")
        write_external(skeleton, stubs, path, path + ".data", "model.onnx.data")
        yield path


def write_external(skeleton: onnx.ModelProto, stubs: list[tuple[onnx.TensorProto, onnx.TensorProto]], path: str, data_path: str,
                    location: str) -> None:
    """Write the stubs' data to ``data_path`` (page-aligned), point each stub at it as
    ``location`` (the data file's name beside the model), and write ``skeleton`` to ``path``."""
    with open(data_path, "wb") as fh:
        for stub, tensor in stubs:
            offset = -(-fh.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
            fh.seek(offset)
            data = _raw_data(tensor)
            fh.write(data)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                stub.external_data.add(key=key, value=value)
    with open(path, "wb") as fh:
        fh.write(skeleton.SerializeToString())


def _stubbable(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.STRING


def _is_stub(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.external_data


def _data_bytes(model: onnx.ModelProto) -> int:
    return sum(_stored_bytes(t) for t in model.graph.initializer)


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes ``tensor`` adds to its model: the length of its raw data, from its type and
    dims (which protobuf cannot otherwise tell without copying it), or its serialized size
    when its values sit in typed fields."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    return data_bytes(tensor)


def element_bits(data_type: int) -> int:
    """Bits one element of an ONNX tensor type takes in raw data (sub-byte types packed)."""
    return _PACKED_BITS.get(data_type) or 8 * helper.tensor_dtype_to_np_dtype(data_type).itemsize


def data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s data as raw data holds it, from its type and dims."""
    return -(-math.prod(tensor.dims) * element_bits(tensor.data_type) // 8)


def _bare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its graph initializers (made without copying them)."""
    bare = onnx.ModelProto()
    _copy_fields(model, bare, skip="graph")
    _copy_fields(model.graph, bare.graph, skip="initializer")
    return bare


def _raw_data(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as external data holds it: its raw_data (little-endian, sub-byte
    types packed)."""
    return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def _copy_fields(source, target, *, skip: str) -> None:
    """Copy every set field of the message ``source`` but ``skip`` into ``target``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "CopyFrom"):
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float)):
            setattr(target, field.name, value)
        else:
            getattr(target, field.name).extend(value)
