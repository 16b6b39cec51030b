"""Self-checks of an exported model: onnx.checker, then a load in plain ONNX Runtime with all optimizations."""
from __future__ import annotations

import onnx
import onnxruntime as ort

from .calibrate import session
from .errors import ExportError
from .modelio import PROTOBUF_LIMIT


def check_exported(model: onnx.ModelProto) -> ort.InferenceSession:
    """The ONNX Runtime session of ``model``; ExportError when either check fails."""
    if model.ByteSize() <= PROTOBUF_LIMIT:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported model fails onnx.checker ({str(exc).splitlines()[0]}); please report this with the model") from None
    try:
        return session(model)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported model ({str(exc).splitlines()[0]}); please report this with the model") from None
