"""Distances between the float model's first output and the quantized model's, per sample.

    loss = mean over calibration samples of d(f_fp32(x), f_q(x))

with d one of ``kl`` (KL(softmax(ref) || softmax(out)), on probabilities directly when the
graph ends in Softmax) for classifiers, ``mse`` (relative: ||out - ref||^2 / ||ref||^2) for
other outputs, ``cosine`` (1 - cos) for embeddings and ``ce`` (cross-entropy against labels).
``auto`` reads the choice off the graph (:func:`auto_loss`) and takes ``mse`` instead of
``kl`` when the reference softmax is saturated (top probability within SATURATED of 1 on
most samples, as with logits in the thousands): there every KL underflows to nothing and
carries no signal for a search.  All arithmetic is float64, whatever the outputs' type.
"""
from __future__ import annotations

import numpy as np
import onnx

SATURATED = 1e-6


def auto_loss(model: onnx.ModelProto) -> str:
    """``kl`` for a classifier (output [N, C] or [N, C, 1, 1] with C > 1, or a Softmax),
    ``cosine`` for a normalized embedding (output made by Div or LpNormalization), else ``mse``."""
    out = model.graph.output[0].type.tensor_type.shape.dim
    dims = [d.dim_value if d.HasField("dim_value") else None for d in out]
    last = _last_op(model)
    if last == "Softmax":
        return "kl"
    if last in ("Div", "LpNormalization"):
        return "cosine"
    classifier = len(dims) >= 2 and (dims[1] or 0) > 1 and all(d == 1 for d in dims[2:])
    return "kl" if classifier and len(model.graph.output) == 1 else "mse"


def resolve_loss(loss: str, model: onnx.ModelProto, reference: list[np.ndarray]) -> str:
    """The distance ``loss`` names for ``model`` whose first output on the calibration
    batches is ``reference``: ``auto`` is :func:`auto_loss`, with ``mse`` instead of
    ``kl`` where the reference softmax is saturated."""
    if loss != "auto":
        return loss
    kind = auto_loss(model)
    return "mse" if kind == "kl" and not outputs_probabilities(model) and _saturated(reference) else kind


def outputs_probabilities(model: onnx.ModelProto) -> bool:
    """Whether the first output is already a probability distribution (made by a Softmax)."""
    return _last_op(model) == "Softmax"


def _last_op(model: onnx.ModelProto) -> str | None:
    """The op that makes the first output, looking through reshapes."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type in ("Reshape", "Flatten", "Squeeze", "Identity"):
        node = producer.get(node.input[0])
    return None if node is None else node.op_type


def _saturated(logits: list[np.ndarray]) -> bool:
    """Whether the softmax of most samples puts all but SATURATED of its mass on one class."""
    top = np.concatenate([np.exp(_log_softmax(z.reshape(len(z), -1).astype(np.float64)).max(axis=1)) for z in logits])
    return float(np.mean(top > 1.0 - SATURATED)) > 0.5


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax along axis 1, shifted by the row maximum so that exp never overflows."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def distance(kind: str, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None, probabilities: bool) -> np.ndarray:
    """Per-sample distance between reference and quantized outputs (float64)."""
    ref = ref.reshape(ref.shape[0], -1).astype(np.float64)
    out = out.reshape(out.shape[0], -1).astype(np.float64)
    if kind in ("kl", "ce"):
        log_q = np.log(np.clip(out, 1e-12, None)) if probabilities else _log_softmax(out)
        if kind == "ce":
            return -log_q[np.arange(len(labels)), labels]
        log_p = np.log(np.clip(ref, 1e-12, None)) if probabilities else _log_softmax(ref)
        return np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    if kind == "cosine":
        num = np.sum(ref * out, axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        return 1.0 - num / np.maximum(den, 1e-12)
    return np.sum((out - ref) ** 2, axis=1) / np.maximum(np.sum(ref**2, axis=1), 1e-12)
