"""Model files: read an ONNX file, and write one atomically (temporary file, then rename).

Writes never touch the input file and never leave a half-written output: the model
(and, over 2 GB, its external data file ``<out>.data``), or a report, is written beside
the target under a temporary name and renamed into place only when complete.  The file
gets the permissions any new file gets (0666 less the umask), as if written directly.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager

import onnx

from .errors import ModelError

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file (with external data beside it); ModelError if it is not one."""
    if not os.path.isfile(path):
        raise ModelError(f"model file {path!r} does not exist: check the path")
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"{path!r} is not a readable ONNX model ({type(exc).__name__}): export it with onnx.save") from None
    if not model.graph.node:
        raise ModelError(f"{path!r} holds no graph nodes: is it an ONNX model?")
    return model


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` (edits and onnx.save never reach the original)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same file (existing or not)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def output_folder(path: str) -> str:
    """The folder a file at ``path`` would be written to, which must exist and be writable
    (``path`` itself must not be a folder)."""
    if os.path.isdir(path):
        raise ModelError(f"output path {path!r} is a folder: give the path of a file (in it, or elsewhere)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ModelError(f"output folder {folder!r} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise ModelError(f"output folder {folder!r} is not writable: choose another output path")
    return folder


def save_model_atomic(model: onnx.ModelProto, path: str) -> None:
    """Write ``model`` to ``path`` all at once; external data beside it when over 2 GB."""
    with _staged(path, ".onnx") as tmp:
        folder = os.path.dirname(tmp)
        tmp_data = tmp + ".data"
        try:
            if model.ByteSize() > PROTOBUF_LIMIT:
                # a copy: onnx.save moves tensors out of the proto it is given
                data_name = os.path.basename(path) + ".data"
                onnx.save(copy_model(model), tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=os.path.basename(tmp_data))
                _relocate_external_data(tmp, data_name)
                os.chmod(tmp_data, os.stat(tmp).st_mode & 0o777)  # onnx writes it private
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


def _relocate_external_data(model_path: str, location: str) -> None:
    """Point every external tensor of the saved model at ``location`` (the final data file name)."""
    model = onnx.load(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    with open(model_path, "wb") as fh:
        fh.write(model.SerializeToString())
