"""Model files: read an ONNX file, and write one atomically (temporary file, then rename).

Reads name the cause when a model's external data cannot be used (a location outside
the model's folder, a missing or short file).  Writes never touch the input file and
never leave a half-written output: the model (and, over 2 GB, its external data file
``<out>.data``), or a report, is written beside the target under a temporary name and
renamed into place only when complete; a target that could not be replaced is refused
before anything is written.  The file gets the permissions any new file gets (0666 less
the umask), as if written directly.  Over 2 GB a model is written as its skeleton and one
external data file (see largemodel).
"""
from __future__ import annotations

import array
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from .errors import ModelError
from .largemodel import over_protobuf_limit, split_large, write_external

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
                write_external(*split_large(model), tmp, tmp_data, data_name)
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


def save_bytes_atomic(data: bytes, path: str) -> None:
    """Write ``data`` (a plot) to ``path`` all at once."""
    with _staged(path, ".tmp") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


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
