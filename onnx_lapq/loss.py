"""The end-to-end calibration loss of candidate quantization parameters, through ONNX Runtime.

    loss(params) = mean over calibration samples of d(f_fp32(x), f_q(x; params))

with d chosen from the model's output: ``kl`` (KL(softmax(ref) || softmax(out)), on
probabilities directly when the graph ends in Softmax) for classifiers, ``mse``
(relative: ||out - ref||^2 / ||ref||^2) for other outputs, ``cosine`` (1 - cos) for
embeddings, ``ce`` (cross-entropy against labels).  The FP32 reference is computed once.

Speed: the quantized graph is the "fed" export (export.py), whose Q/DQ numbers are
graph inputs, so one ONNX Runtime session serves every candidate; its numerics are
those of the exported model (fused integer kernels aside).  The graph is also cut
before the first node of each tunable site: a cut's live tensors are cached with the
parameter values they were computed under, and an evaluation runs only the part of
the graph after the deepest cut whose upstream parameters have not changed (a
coordinate search changes one site at a time, so most evaluations run a short
suffix).  Cuts are chosen within a memory budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .calibrate import session
from .config import LOSSES
from .errors import ConfigError
from .export import export_qdq, qdq_tensors
from .params import QParams
from .plan import QuantPlan

log = logging.getLogger(__name__)


def auto_loss(model: onnx.ModelProto) -> str:
    """``kl`` for a classifier (one output of shape [N, C] or [N, C, 1, 1], C > 1), else ``mse``."""
    out = model.graph.output[0].type.tensor_type.shape.dim
    dims = [d.dim_value if d.HasField("dim_value") else None for d in out]
    classifier = len(dims) >= 2 and (dims[1] or 0) > 1 and all(d == 1 for d in dims[2:])
    return "kl" if classifier and len(model.graph.output) == 1 else "mse"


def _ends_in_softmax(model: onnx.ModelProto) -> bool:
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type in ("Reshape", "Flatten", "Squeeze", "Identity"):
        node = producer.get(node.input[0])
    return node is not None and node.op_type == "Softmax"


def _log_softmax(z: np.ndarray) -> np.ndarray:
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


@dataclass
class _Cut:
    """A position in the node list with the tensors alive across it and their cached values."""

    position: int
    live: list[str]
    upstream: list[str]  # fed inputs read before the cut
    versions: tuple | None = None
    values: list[list[np.ndarray]] | None = None  # per batch, per live tensor


class LossEvaluator:
    """``evaluator(params) -> float``: the calibration loss of a full set of QParams."""

    def __init__(
        self,
        model: onnx.ModelProto,
        plan: QuantPlan,
        batches: list[dict[str, np.ndarray]],
        init_params: dict[str, QParams],
        *,
        loss: str = "auto",
        labels: np.ndarray | None = None,
        memory_budget: int = 1 << 30,
    ):
        if loss not in LOSSES:
            raise ConfigError(f"loss={loss!r} is unknown: use one of {', '.join(LOSSES)}")
        if loss == "ce" and labels is None:
            raise ConfigError("loss='ce' needs labels: add a 'label' array to the calibration data or choose kl/mse/cosine")
        self.kind = auto_loss(model) if loss == "auto" else loss
        self.probabilities = _ends_in_softmax(model)
        self.plan = plan
        self.batches = batches
        self.labels = [labels[i:i + len(b[next(iter(b))])] for i, b in zip(_offsets(batches), batches)] if labels is not None else None
        self.weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.output = model.graph.output[0].name
        reference = session(model)
        self.reference = [reference.run([self.output], b)[0] for b in batches]
        self.samples = sum(len(r) for r in self.reference)
        self.fed = export_qdq(model, plan, init_params, fed=True)
        self._raw: dict[str, np.ndarray] = {}
        self._current: dict[str, np.ndarray | ort.OrtValue] = {}
        self._version: dict[str, int] = {}
        self._site_params: dict[str, tuple] = {}
        self._update_feeds(init_params)
        self.cuts = self._choose_cuts(memory_budget)
        self._sessions = [session(self._suffix(c)) for c in self.cuts]
        self.evaluations = 0
        self.suffix_nodes = 0

    # ----------------------------------------------------------------- public
    def __call__(self, params: dict[str, QParams]) -> float:
        self._update_feeds(params)
        start = self._deepest_valid_cut()
        cut, sess = self.cuts[start], self._sessions[start]
        later = self.cuts[start + 1:]
        names = [self.output] + [t for c in later for t in c.live]
        fed_inputs = [i.name for i in sess.get_inputs() if i.name in self._current]
        total = 0.0
        fresh = [[] for _ in later]
        for b, batch in enumerate(self.batches):
            feeds = {name: self._current[name] for name in fed_inputs}
            feeds.update(zip(cut.live, cut.values[b]) if cut.values is not None else batch.items())
            outputs = sess.run(names, feeds)
            labels = self.labels[b] if self.labels is not None else None
            total += float(distance(self.kind, self.reference[b], outputs[0], labels, self.probabilities).sum())
            k = 1
            for i, c in enumerate(later):
                fresh[i].append(outputs[k:k + len(c.live)])
                k += len(c.live)
        for c, values in zip(later, fresh):
            c.values, c.versions = values, self._versions(c)
        self.evaluations += 1
        self.suffix_nodes += len(self.fed.graph.node) - cut.position
        return total / self.samples

    def measure(self, quantized: "ort.InferenceSession") -> float:
        """The loss of a quantized model's own session (e.g. the exported model) on the same samples."""
        total = 0.0
        for b, batch in enumerate(self.batches):
            out = quantized.run([self.output], batch)[0]
            labels = self.labels[b] if self.labels is not None else None
            total += float(distance(self.kind, self.reference[b], out, labels, self.probabilities).sum())
        return total / self.samples

    @property
    def mean_suffix_fraction(self) -> float:
        """Average share of the graph's nodes that an evaluation ran."""
        return self.suffix_nodes / max(self.evaluations, 1) / max(len(self.fed.graph.node), 1)

    # ----------------------------------------------------------------- feeds
    def _update_feeds(self, params: dict[str, QParams]) -> None:
        changed = set()
        for name, qp in params.items():
            key = (qp.scale.tobytes(), qp.zero_point.tobytes())
            if self._site_params.get(name) != key:
                self._site_params[name] = key
                changed.add(name)
        if not changed:
            return
        for name, (value, dtype) in qdq_tensors(self.weights, self.plan, params, fed=True, sites=changed).items():
            old = self._raw.get(name)
            if old is None or old.shape != value.shape or not np.array_equal(old, value):
                self._raw[name] = value
                self._current[name] = _feed(value, dtype)
                self._version[name] = self._version.get(name, 0) + 1

    def _versions(self, cut: _Cut) -> tuple:
        return tuple(self._version.get(n, 0) for n in cut.upstream)

    def _deepest_valid_cut(self) -> int:
        for i in range(len(self.cuts) - 1, 0, -1):
            c = self.cuts[i]
            if c.values is not None and c.versions == self._versions(c):
                return i
        return 0

    # ----------------------------------------------------------------- cuts
    def _choose_cuts(self, budget: int) -> list[_Cut]:
        nodes = list(self.fed.graph.node)
        fed_names = set(self._current)
        data_inputs = [i.name for i in self.fed.graph.input if i.name not in fed_names]
        first_use: dict[str, int] = {}
        for pos, node in enumerate(nodes):
            for name in node.input:
                if name in fed_names:
                    first_use.setdefault(name, pos)
        candidates = sorted(set(first_use.values()) - {0})
        sizes = self._tensor_bytes()
        cuts = [_Cut(0, data_inputs, [])]
        spent = 0
        for pos in candidates:
            live = _live_tensors(nodes, pos, {t.name for t in self.fed.graph.initializer} | fed_names, self.fed.graph.output)
            cost = sum(sizes.get(t, budget + 1) for t in live)
            if not live or spent + cost > budget:
                continue
            upstream = sorted(n for n, p in first_use.items() if p < pos)
            cuts.append(_Cut(pos, live, upstream))
            spent += cost
        log.debug("loss evaluator: %d cuts, %.1f MB of cached activations", len(cuts) - 1, spent / 1e6)
        return cuts

    def _tensor_bytes(self) -> dict[str, int]:
        """Bytes of every float tensor over all calibration samples, from a probe run of one batch."""
        graph = self.fed.graph
        float_names = [v.name for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
        probe = onnx.ModelProto()
        probe.CopyFrom(self.fed)
        known = {o.name for o in probe.graph.output}
        produced = {o for n in graph.node for o in n.output}
        for name in float_names:
            if name not in known and name in produced:
                probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        names = [o.name for o in probe.graph.output]
        feeds = {**self._current, **self.batches[0]}
        values = session(probe, optimize=False).run(names, feeds)
        rows = len(next(iter(self.batches[0].values())))
        return {n: v.nbytes * self.samples // max(rows, 1) for n, v in zip(names, values)}

    def _suffix(self, cut: _Cut) -> onnx.ModelProto:
        """The fed model from ``cut`` on, returning the output and every later cut's live tensors."""
        model = onnx.ModelProto()
        model.CopyFrom(self.fed)
        graph = model.graph
        types = {v.name: v for v in list(graph.value_info) + list(graph.input)}
        keep = list(graph.node)[cut.position:]
        del graph.node[:]
        graph.node.extend(keep)
        used = {n for node in keep for n in node.input}
        inputs = [types[t] if t in types else helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in cut.live]
        inputs += [i for i in self.fed.graph.input if i.name in used and i.name not in cut.live]
        del graph.input[:]
        graph.input.extend(inputs)
        later = [t for c in self.cuts if c.position > cut.position for t in c.live]
        outputs = [o for o in graph.output if o.name == self.output]
        outputs += [types[t] if t in types else helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in dict.fromkeys(later) if t != self.output]
        del graph.output[:]
        graph.output.extend(outputs)
        kept_inits = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        return model


def _feed(value: np.ndarray, dtype: int):
    """A feed for a fed Q/DQ tensor: numpy arrays as they are, 4-bit scalars as typed OrtValues."""
    if dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        if value.ndim:
            raise ValueError("only scalar 4-bit tensors are fed")  # weights are fed in 8-bit containers
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.astype(np.uint8 if dtype == onnx.TensorProto.UINT4 else np.int8), dtype)
    return value


def _offsets(batches: list[dict[str, np.ndarray]]) -> list[int]:
    out, at = [], 0
    for b in batches:
        out.append(at)
        at += len(next(iter(b.values())))
    return out


def _live_tensors(nodes: list[onnx.NodeProto], position: int, constants: set[str], outputs) -> list[str]:
    """Tensors made before ``position`` (or graph inputs) and read at or after it."""
    made_before = {o for n in nodes[:position] for o in n.output}
    read_after = {i for n in nodes[position:] for i in n.input}
    graph_outputs = {o.name for o in outputs}
    live = [t for t in dict.fromkeys(i for n in nodes[position:] for i in n.input) if t and t not in constants and (t in made_before or t not in {o for n in nodes for o in n.output})]
    live += [t for t in graph_outputs if t in made_before and t not in live]
    return [t for t in live if t in read_after or t in graph_outputs]
