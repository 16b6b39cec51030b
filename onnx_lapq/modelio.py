"""Model files: read an ONNX file, and write one atomically (temporary file, then rename).

Reads name the cause when a model's external data cannot be used (a location outside
the model's folder, a missing or short file).  Writes never touch the input file and
never leave a half-written output: the model (and, over 2 GB, its external data file
``<out>.data``), or a report, is written beside the target under a temporary name and
renamed into place only when complete; a target that could not be replaced is refused
before anything is written.  The file gets the permissions any new file gets (0666 less
the umask), as if written directly.

Protobuf cannot serialize a model over 2 GB (PROTOBUF_LIMIT), and every tool that takes a
model as bytes (onnx's shape inference and version converter, ONNX Runtime) inherits that
limit.  :func:`split_large` gives such a model's skeleton, its large initializers replaced
by stubs that carry only name, type and dims, for those tools; :func:`fill_stubs` puts the
data back; :func:`temporary_model_file` writes a skeleton with its stubs' data in an
external data file, for ONNX Runtime to load from a path.
"""
from __future__ import annotations

import array
import math
import os
import secrets
import stat
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import onnx
from google.protobuf.message import EncodeError
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from .errors import ModelError

PROTOBUF_LIMIT = 2**31 - 1
TENSOR_LIMIT = PROTOBUF_LIMIT  # one tensor: what protobuf copies as one message
STUB_BYTES = 1 << 20  # initializers over this size are always stubs in a skeleton
DATA_ALIGNMENT = 4096  # external data offsets: a page, so that ONNX Runtime can map each tensor
# element types packed below a byte per element (those this onnx version knows)
_PACKED_BITS = {getattr(onnx.TensorProto, n): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(onnx.TensorProto, n)}
FS_IOC_GETFLAGS = 0x80086601  # Linux: a file's attributes (chattr)
FS_UNCHANGEABLE_FLAGS = {0x10: "immutable", 0x20: "append-only"}


def load_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file (with its external data); ModelError if it is not one or its
    external data cannot be used."""
    model = read_model(path)
    load_external_data(model, path)
    return model


def read_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file without its external data (see :func:`load_external_data`)."""
    if not os.path.isfile(path):
        raise ModelError(f"model file {path!r} does not exist: check the path")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"{path!r} is not a readable ONNX model ({type(exc).__name__}): export it with onnx.save") from None
    if not model.graph.node:
        raise ModelError(f"{path!r} holds no graph nodes: is it an ONNX model?")
    return model


def load_external_data(model: onnx.ModelProto, path: str) -> None:
    """Load into ``model`` (read from ``path`` by :func:`read_model`) its external data."""
    external_data_files(model, path)
    try:
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:
        raise ModelError(f"the external data of {path!r} cannot be read ({type(exc).__name__}: {exc}): save the model again with onnx.save") from None


def external_data_files(model: onnx.ModelProto, path: str) -> list[str]:
    """The files holding the external data of ``model`` read from ``path``, each once;
    ModelError when a location leaves the model's folder or names a missing or short file."""
    folder = os.path.dirname(os.path.abspath(path))
    files: list[str] = []
    for tensor in _tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        file = os.path.join(folder, info.location)
        if os.path.isabs(info.location) or os.path.commonpath([os.path.realpath(file), os.path.realpath(folder)]) != os.path.realpath(folder):
            raise ModelError(
                f"tensor {tensor.name!r} of {path!r} has its external data at {info.location!r}, outside the model's folder: "
                "keep external data files in the model's folder (or below it) and save the model again"
            )
        if not os.path.isfile(file):
            raise ModelError(f"external data file {file!r} of tensor {tensor.name!r} is missing: put it beside {path!r} as saved")
        end = (info.offset or 0) + (info.length or 0)
        size = os.path.getsize(file)
        if end > size:
            raise ModelError(
                f"external data file {file!r} is too short for tensor {tensor.name!r} ({size} bytes, the tensor ends at byte {end}): "
                "it is truncated or belongs to another model; copy it again with the model"
            )
        if file not in files:
            files.append(file)
    return files


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


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
    """The bytes of ``model`` serialized; over protobuf's limit (which it refuses even to
    measure: upb sizes a message by serializing it) the size of the rest of the model plus
    the bytes of its initializers' data."""
    data = _data_bytes(model)
    if data <= PROTOBUF_LIMIT:
        try:
            return model.ByteSize()
        except EncodeError:  # over the limit after all, in the fields around the data
            return max(PROTOBUF_LIMIT + 1, _bare(model).ByteSize() + data)
    return _bare(model).ByteSize() + data


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
            stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, data_location=onnx.TensorProto.EXTERNAL)
            pairs.append((stub, tensor))
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton, pairs


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
        _write_external(skeleton, stubs, path, path + ".data", "model.onnx.data")
        yield path


def _write_external(skeleton: onnx.ModelProto, stubs: list[tuple[onnx.TensorProto, onnx.TensorProto]], path: str, data_path: str,
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
    bits = _PACKED_BITS.get(tensor.data_type) or 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return -(-math.prod(tensor.dims) * bits // 8)


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


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same file (existing or not)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def output_folder(path: str) -> str:
    """The folder a file at ``path`` would be written to, which must exist and be writable
    (``path`` itself must be new or a file that a rename can replace)."""
    if os.path.isdir(path):
        raise ModelError(f"output path {path!r} is a folder: give the path of a file (in it, or elsewhere)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ModelError(f"output folder {folder!r} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise ModelError(f"output folder {folder!r} is not writable: choose another output path")
    problem = _unreplaceable(path, folder)
    if problem:
        raise ModelError(f"output path {path!r} {problem}: choose another output path")
    return folder


def _unreplaceable(path: str, folder: str) -> str | None:
    """Why renaming a new file onto ``path`` would fail (or replace what is no file), or None."""
    if len(os.fsencode(os.path.basename(path))) > os.pathconf(folder, "PC_NAME_MAX"):
        return f"has a name longer than its file system allows ({os.pathconf(folder, 'PC_NAME_MAX')} bytes)"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):  # a rename replaces the link, not its target
        return None
    if not stat.S_ISREG(info.st_mode):
        return "exists and is not a regular file (a device, pipe or socket)"
    flags = _file_flags(path)
    for flag, name in FS_UNCHANGEABLE_FLAGS.items():
        if flags & flag:
            return f"is an existing {name} file (chattr +{name[0]}), which no rename replaces"
    owner = os.stat(folder)
    if owner.st_mode & stat.S_ISVTX and os.geteuid() not in (0, info.st_uid, owner.st_uid):
        return "is another user's file in a sticky folder, which only its owner may replace"
    return None


def _file_flags(path: str) -> int:
    """The file attributes of ``path`` (Linux chattr flags; 0 where the system has none)."""
    try:
        import fcntl  # Unix only
    except ImportError:
        return 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        return flags[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def save_model_atomic(model: onnx.ModelProto, path: str) -> None:
    """Write ``model`` to ``path`` all at once; external data beside it when over 2 GB."""
    with _staged(path, ".onnx") as tmp:
        folder = os.path.dirname(tmp)
        tmp_data = tmp + ".data"
        try:
            if over_protobuf_limit(model):
                data_name = os.path.basename(path) + ".data"
                _write_external(*split_large(model), tmp, tmp_data, data_name)
                os.replace(tmp_data, os.path.join(folder, data_name))
            else:
                with open(tmp, "wb") as fh:
                    fh.write(model.SerializeToString())
        finally:
            if os.path.exists(tmp_data):
                os.remove(tmp_data)


def save_text_atomic(text: str, path: str) -> None:
    """Write ``text`` (a report) to ``path`` all at once."""
    with _staged(path, ".tmp") as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


@contextmanager
def _staged(path: str, suffix: str):
    """A new empty file beside ``path`` to write; renamed onto ``path`` when the block ends
    normally, removed when it raises."""
    folder = output_folder(path)
    while True:
        tmp = os.path.join(folder, f".onnx_lapq-{secrets.token_hex(8)}{suffix}")
        try:  # O_EXCL: never another's file; mode 0o666, which the umask narrows as for any new file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
