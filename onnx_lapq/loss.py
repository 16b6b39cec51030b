"""The end-to-end calibration loss of candidate quantization parameters, through ONNX Runtime.

    loss(params) = mean over calibration samples of d(f_fp32(x), f_q(x; params))

with d chosen from the model's output: ``kl`` (KL(softmax(ref) || softmax(out)), on
probabilities directly when the graph ends in Softmax) for classifiers, ``mse``
(relative: ||out - ref||^2 / ||ref||^2) for other outputs, ``cosine`` (1 - cos) for
embeddings, ``ce`` (cross-entropy against labels).  The FP32 reference is computed once.
``auto`` takes ``mse`` instead of ``kl`` when the reference softmax is saturated (top
probability within SATURATED of 1 on most samples, as with mnist-8's logits in the
thousands): there every KL is ~1e-49 and carries no signal for the search.

Two ways to run the quantized graph, measured (DESIGN.md, README) and chosen by structure,
so that the machine's load never changes the mode or the model:
  * fed (any sub-8-bit site, which no CPU kernel fuses, or cuts too shallow for fused):
    the Q/DQ numbers are graph inputs (export.py's fed export), so one session per graph
    suffix serves every candidate; each suffix declares the shapes of the tensors it
    starts from, and no cut separates a Gemm or MatMul from its DequantizeLinear inputs or
    a convolution's residual Add from its other input (_cut_candidates), so ONNX Runtime
    fuses every suffix as it fuses the whole graph, and the whole graph as it fuses the
    exported model: the loss is the same bit for bit from any cut;
  * fused (8-bit weights and activations, when cuts where only integer codes cross let
    evaluations skip at least 2/3 as much of the graph as fed cuts: _fused_cuts_are_fine): the
    numbers are constants, as in the exported model, so ONNX Runtime runs its integer
    kernels; each evaluation builds and opens a session for the suffix it runs (tens of
    ms, still cheaper than float fake-quant), whose 4-D cut tensors cross in NHWC with
    declared shapes, the integer kernels' own layout.
All these sessions draw on one shared memory arena.  An arena per fed suffix cost
gigabytes (squeezenet1.1 W4A4: 6.8 GB peak, 2.5 GB shared); no arena made every run
fetch fresh memory (mobilenet_v2 W4A8: 4.9x an FP32 pass, 3.3x shared); a fused
session's own arena starts empty at every evaluation (mobilenet_v1_0.25 W8A8: 0.63x,
0.58x shared).
Fed, sub-8-bit activations that only convolutions read travel in 8-bit containers
(``plan.carried_in_bytes``): the same values, faster kernels.  Either way an evaluation runs
up to MAX_CONCURRENT_BATCHES calibration batches at once, each session on cores / 2
threads: ONNX Runtime's DequantizeLinear runs on one thread whatever the session's
setting, and took a fifth of a fed MobileNetV2 W4A4 pass.  The kernels give the same
bits on one thread as on two (whole fed graphs of mobilenet_v2 and cifar10_resnet56 W4A4
compared; every bench row's exported loss is checked against the search's).
The graph is cut before the first node of tunable sites: a cut's live
tensors are cached with the parameter versions they were computed under, and an
evaluation runs only the graph after the deepest cut whose upstream parameters have
not changed (a coordinate search changes one site at a time).  Cuts are chosen within
a memory budget.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .calibrate import quantized_session, session
from .options import LOSSES
from .errors import ConfigError
from .export import FOUR_BIT, export_qdq, proto, qdq_tensors
from .largemodel import copy_model
from .params import QParams
from .plan import QuantPlan, carried_in_bytes
from .solution import Solution

log = logging.getLogger(__name__)
MAX_CUTS = 16
CHANNELS_LAST = "_nhwc"
FP32_TIMINGS = 3  # warm FP32 passes timed before the search ...
FP32_EVERY = 50  # ... and one more after every 50th evaluation, so that both see the same machine load
SATURATED = 1e-6
MAX_CONCURRENT_BATCHES = 2  # calibration batches an evaluation runs at once, each on cores // 2 threads
FUSED_DEPTH_TOLERANCE = 1.5  # fused kernels run a node several times faster than fed fake-quant


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
    upstream: list[str]  # Q/DQ tensors read before the cut
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
        fused: bool | None = None,
        solution: Solution | None = None,
    ):
        if loss not in LOSSES:
            raise ConfigError(f"loss={loss!r} is unknown: use one of {', '.join(LOSSES)}")
        if loss == "ce" and labels is None:
            raise ConfigError("loss='ce' needs labels: name the labels array of the calibration data with label_key (CLI: --labels KEY) or choose kl/mse/cosine")
        self.probabilities = outputs_probabilities(model)
        self.plan = carried_in_bytes(model, plan)
        self.batches = batches
        self.labels = [labels[i:i + len(b[next(iter(b))])] for i, b in zip(_offsets(batches), batches)] if labels is not None else None
        self.output = model.graph.output[0].name
        self._fp32 = session(model)
        self.reference = [self._fp32.run([self.output], b)[0] for b in batches]
        self.fp32_passes = [_timed_pass(self._fp32, self.output, batches) for _ in range(FP32_TIMINGS)]
        self.samples = sum(len(r) for r in self.reference)
        self.kind = resolve_loss(loss, model, self.reference)
        self.solution = Solution.of(model, plan) if solution is None else solution
        self.fused = all(a.bits == 8 for a in plan.activations) and all(w.bits == 8 for w in plan.weights) if fused is None else fused
        self._build(model, init_params)
        if fused is None and self.fused and not self._fused_cuts_are_fine():
            self.fused = False
            self._build(model, init_params)
        self.cuts = self._choose_cuts(memory_budget)
        data_inputs = set(batches[0])
        self._channels_last = {t for c in self.cuts for t in c.live if self.fused and t not in data_inputs and _rank(self._types.get(t)) == 4}
        cores = _cores()
        self._workers = min(len(batches), MAX_CONCURRENT_BATCHES, cores)
        self._threads = max(1, cores // self._workers)
        self._pool = ThreadPoolExecutor(self._workers)  # its threads end when the evaluator is collected
        self._fed_sessions = [] if self.fused else [self._suffix_session(c, self._refreshed_after(i)) for i, c in enumerate(self.cuts)]
        self.evaluations = 0
        self.suffix_nodes = 0
        self.eval_seconds = 0.0

    def _build(self, model: onnx.ModelProto, init_params: dict[str, QParams]) -> None:
        """The QDQ template of the current mode, its Q/DQ numbers at ``init_params`` and the
        value info of every tensor."""
        self.template = export_qdq(model, self.plan, init_params, self.solution, fed=not self.fused)
        self._raw: dict[str, tuple[np.ndarray, int]] = {}
        self._feeds: dict[str, np.ndarray | ort.OrtValue] = {}
        self._version: dict[str, int] = {}
        self._site_params: dict[str, tuple] = {}
        self._update(init_params)
        bare = self._with_numbers(self.template)
        del bare.graph.value_info[:]  # the model's own may be stale (a fixed batch of 1 where inputs are symbolic)
        typed = onnx.shape_inference.infer_shapes(bare)
        self._types = {v.name: v for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)
                       if v.type.tensor_type.elem_type}

    def _fused_cuts_are_fine(self) -> bool:
        """Whether the fused graph's cuts (integer codes only) let a sweep over the sites skip
        at least 1/FUSED_DEPTH_TOLERANCE as much of the graph as fed cuts, one right before
        each site, would.  What a sweep skips: the mean over sites of the share of nodes before
        the deepest cut before the site, both kinds of cut thinned to MAX_CUTS as
        _choose_cuts does.  Where a float tensor crosses every point of the graph
        (all-MiniLM-L6-v2's attention-mask bias) no cut qualifies and every fused evaluation
        would open and run the whole model: 1.9x an FP32 pass against 0.5x fed.  Structure,
        not a timing, so the same inputs give the same model."""
        nodes = len(self.template.graph.node)
        first_use = self._first_use()
        sites = sorted(set(first_use.values()))

        def skipped(cut_positions: list[int]) -> float:
            cuts = [0] + _spread(cut_positions)
            return float(np.mean([max(c for c in cuts if c <= p) for p in sites])) / nodes

        fused = skipped([pos for pos, _ in self._cut_candidates(first_use)])
        return bool(sites) and fused * FUSED_DEPTH_TOLERANCE >= skipped([p for p in sites if p > 0])

    def _suffix_session(self, cut, later) -> ort.InferenceSession:
        """A session of the graph after ``cut`` (see calibrate.quantized_session)."""
        return quantized_session(
            self._suffix(cut, later), "the quantized model the search evaluates", threads=self._threads, arena="shared",
            advice="; other bit-widths, or --exclude on the layers its message names, may avoid it",
        )

    # ----------------------------------------------------------------- public
    def __call__(self, params: dict[str, QParams]) -> float:
        started = time.perf_counter()
        self._update(params)
        start = self._deepest_valid_cut()
        cut = self.cuts[start]
        later = self._refreshed_after(start)
        sess = self._suffix_session(cut, later) if self.fused else self._fed_sessions[start]
        names = [self.output] + [self._boundary(t) for c in later for t in c.live]
        fed = {i.name: self._feeds[i.name] for i in sess.get_inputs() if i.name in self._feeds}

        def run(b: int) -> tuple[float, list]:
            feeds = dict(fed)
            feeds.update(zip(map(self._boundary, cut.live), cut.values[b]) if cut.values is not None else self.batches[b].items())
            outputs = sess.run(names, feeds)
            return float(self._distance(b, outputs[0]).sum()), outputs[1:]

        results = list(self._pool.map(run, range(len(self.batches))))
        total = sum(r[0] for r in results)
        k = 0
        for c in later:
            c.values = [r[1][k:k + len(c.live)] for r in results]
            c.versions = self._versions(c)
            k += len(c.live)
        self.evaluations += 1
        self.suffix_nodes += len(self.template.graph.node) - cut.position
        self.eval_seconds += time.perf_counter() - started
        if self.evaluations % FP32_EVERY == 0:
            self.fp32_passes.append(_timed_pass(self._fp32, self.output, self.batches))
        return total / self.samples

    def close(self) -> None:
        """Stop the threads that run batches and drop the sessions and cached tensors, whose
        memory goes back to the shared arena and the system even while something (say, the
        traceback of an interrupted search) still holds the evaluator; it cannot evaluate after."""
        self._pool.shutdown()
        self._fed_sessions, self._fp32 = [], None
        for cut in self.cuts:
            cut.values = None

    def measure(self, quantized: ort.InferenceSession) -> float:
        """The loss of a quantized model's own session (e.g. the exported model) on the same samples."""
        total = sum(float(self._distance(b, quantized.run([self.output], batch)[0]).sum()) for b, batch in enumerate(self.batches))
        return total / self.samples

    @property
    def mean_suffix_fraction(self) -> float:
        """Average share of the graph's nodes that an evaluation ran."""
        return self.suffix_nodes / max(self.evaluations, 1) / max(len(self.template.graph.node), 1)

    @property
    def fp32_seconds(self) -> float:
        """Median seconds of the timed FP32 passes over the calibration samples."""
        return float(np.median(self.fp32_passes))

    @property
    def cost_ratio(self) -> float:
        """Mean seconds of one evaluation over the median seconds of an FP32 pass over the same
        samples; FP32 passes are timed through the search, so a shared machine's load weighs
        on both alike."""
        return self.eval_seconds / max(self.evaluations, 1) / max(self.fp32_seconds, 1e-9)

    def _distance(self, b: int, out: np.ndarray) -> np.ndarray:
        labels = self.labels[b] if self.labels is not None else None
        return distance(self.kind, self.reference[b], out, labels, self.probabilities)

    def use(self, solution: Solution) -> None:
        """Evaluate ``solution``'s weights and biases from now on (e.g. with bias correction
        switched on or off); every Q/DQ number is recomputed at the next evaluation."""
        self.solution = solution
        self._site_params = {}

    # ----------------------------------------------------------------- Q/DQ numbers
    def _update(self, params: dict[str, QParams]) -> None:
        """Recompute the Q/DQ tensors of sites whose parameters changed; bump their versions."""
        changed = set()
        for name, qp in params.items():
            key = (qp.scale.tobytes(), qp.zero_point.tobytes())
            if self._site_params.get(name) != key:
                self._site_params[name] = key
                changed.add(name)
        if not changed:
            return
        if self.solution.input_means:  # a corrected bias moves with its weight's grid, even where its own scale does not
            changed |= {b.tensor for b in self.plan.biases if b.weight_tensor in changed}
        for name, (value, dtype) in qdq_tensors(self.solution, self.plan, params, fed=True, sites=changed).items():
            old = self._raw.get(name)
            if old is None or old[0].shape != value.shape or not np.array_equal(old[0], value):
                self._raw[name] = (value, dtype)
                if not self.fused:
                    self._feeds[name] = _feed(value, dtype)
                self._version[name] = self._version.get(name, 0) + 1

    def _refreshed_after(self, start: int) -> list[_Cut]:
        """The cuts whose tensors an evaluation from cut ``start`` also returns: all later ones
        when fed; only the next one when fused, since each returned tensor stops ONNX Runtime
        from fusing the layer that makes it."""
        return self.cuts[start + 1:start + 2] if self.fused else self.cuts[start + 1:]

    def _boundary(self, tensor: str) -> str:
        """The name of a cut tensor where it leaves one session and enters the next.

        Fused, 4-D tensors cross in NHWC (a Transpose each side): ONNX Runtime runs its
        integer convolutions in NHWC, and a suffix whose NCHW input reaches both a
        convolution and a residual Add otherwise runs every later Add in NCHW between
        Transposes (cifar10_resnet20, suffixes from the first block on: 1.2x slower)."""
        return tensor + CHANNELS_LAST if tensor in self._channels_last else tensor

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
        """Of the candidate cuts, at most MAX_CUTS, evenly spread, within ``budget`` bytes."""
        sizes = self._tensor_bytes()
        first_use = self._first_use()
        valid = [(pos, live) for pos, live in self._cut_candidates(first_use) if all(t in sizes for t in live)]
        valid = _spread(valid)
        cuts = [_Cut(0, list(self.batches[0]), [])]
        spent = 0
        for pos, live in valid:
            cost = sum(sizes[t] for t in live)
            if spent + cost > budget:
                continue
            cuts.append(_Cut(pos, live, sorted(n for n, p in first_use.items() if p < pos)))
            spent += cost
        log.debug("loss evaluator: %d cuts, %.1f MB of cached activations", len(cuts) - 1, spent / 1e6)
        return cuts

    def _cut_candidates(self, first_use: dict[str, int]) -> list[tuple[int, list[str]]]:
        """(position, live tensors) before the first node that reads each tunable tensor
        (``first_use``: the template's ``_first_use()``).

        Fused, a cut's tensors must be integer codes (QuantizeLinear outputs) or data inputs:
        a DequantizeLinear output fed from outside, such as a weight's dequantized values
        made before the cut, keeps ONNX Runtime from fusing its consumer into an integer
        kernel, whose rounding differs (cifar10_resnet20 W8A8: 7.5% between search and
        export).  So cuts also go right after each QuantizeLinear and only such cuts are kept.
        Fed, ONNX Runtime still fuses a Gemm or MatMul with the DequantizeLinear nodes of its
        8-bit inputs (QGemm, MatMulIntegerToFloat), and a convolution with the residual Add
        after it (FusedConv with a sum input) only where the Add's other input is not a
        graph input (cifar10_resnet56 W4A4: suffixes starting inside a block rounded
        differently, exported/final loss 1.0081).  So no tensor that such a Gemm, MatMul or
        convolution's Add after the cut reads may cross a fed cut.
        """
        nodes = list(self.template.graph.node)
        candidates = set(first_use.values())
        if self.fused:
            candidates |= {pos + 1 for pos, node in enumerate(nodes) if node.op_type == "QuantizeLinear"}
        producer = {o: n.op_type for n in nodes for o in n.output}
        last_fusable_use: dict[str, int] = {}  # fed: tensor -> last node that ONNX Runtime may fuse with its producer or its partner
        for pos, node in enumerate(nodes if not self.fused else []):
            if node.op_type in ("Gemm", "MatMul"):
                last_fusable_use.update({i: pos for i in node.input if producer.get(i) == "DequantizeLinear"})
            if node.op_type == "Add" and any(producer.get(i) == "Conv" for i in node.input):
                last_fusable_use.update({i: pos for i in node.input})
        constants = {t.name for t in self.template.graph.initializer} | set(self._raw)
        found = []
        for pos in sorted(candidates - {0, len(nodes)}):
            live = _live_tensors(nodes, pos, constants, self.output)
            if self.fused:
                unfit = any(producer.get(t, "input") not in ("QuantizeLinear", "input") for t in live)
            else:
                unfit = any(last_fusable_use.get(t, -1) >= pos for t in live)
            if live and not unfit:
                found.append((pos, live))
        return found

    def _first_use(self) -> dict[str, int]:
        """Q/DQ tensor -> position of the first node that reads it."""
        first_use: dict[str, int] = {}
        for pos, node in enumerate(self.template.graph.node):
            for name in node.input:
                if name in self._raw:
                    first_use.setdefault(name, pos)
        return first_use

    def _tensor_bytes(self) -> dict[str, int]:
        """Bytes of every tensor over all calibration samples, from a probe run of one batch."""
        probe = self._with_numbers(self.template)
        known = {o.name for o in probe.graph.output}
        for node in probe.graph.node:
            for name in node.output:
                elem = self._types[name].type.tensor_type.elem_type if name in self._types else None
                if name not in known and elem not in (None, *FOUR_BIT):  # numpy has no 4-bit type
                    probe.graph.output.append(helper.make_tensor_value_info(name, elem, None))
                    known.add(name)
        names = [o.name for o in probe.graph.output]
        values = session(probe, optimize=False).run(names, {**self._feeds, **self.batches[0]})
        rows = len(next(iter(self.batches[0].values())))
        sizes = {n: v.nbytes for n, v in zip(names, values)}
        sizes.update({n: v.nbytes for n, v in self.batches[0].items()})
        return {n: b * self.samples // max(rows, 1) for n, b in sizes.items()}

    def _with_numbers(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` itself when fed; else a copy with the current Q/DQ numbers as initializers."""
        if not self.fused:
            return copy_model(model)
        out = copy_model(model)
        used = {n for node in out.graph.node for n in node.input}
        kept = [t for t in out.graph.initializer if t.name not in self._raw]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        out.graph.initializer.extend(proto(n, v, d) for n, (v, d) in self._raw.items() if n in used)
        return out

    def _suffix(self, cut: _Cut, later_cuts: list[_Cut]) -> onnx.ModelProto:
        """The quantized graph from ``cut`` on, returning the output and ``later_cuts``' live tensors."""
        model = copy_model(self.template)
        graph = model.graph
        types = self._types
        keep = list(graph.node)[cut.position:]
        used = {n for node in keep for n in node.input}

        def info(name: str) -> onnx.ValueInfoProto:
            # With its inferred shape.  Fused, without one ONNX Runtime cannot plan the NHWC layout
            # of the integer kernels and wraps each in Transposes (cifar10_resnet20: 1.35x slower).
            # Fed, without one it does not fuse a convolution with its residual Add and Relu as
            # it does in the whole graph, and the suffix rounds differently (cifar10_resnet56
            # W4A4 at 8c6ad1f, a cut on a QuantizeLinear output: exported/final loss 1.0081).
            if name in types:
                return onnx.ValueInfoProto.FromString(types[name].SerializeToString())
            return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)

        def crossing(name: str) -> onnx.ValueInfoProto:
            """``name`` as it crosses the boundary: under its _boundary name, NHWC-shaped if channels-last."""
            value = info(name)
            if name in self._channels_last:
                value.name = self._boundary(name)
                dims = value.type.tensor_type.shape.dim
                permuted = [onnx.TensorShapeProto.Dimension.FromString(dims[i].SerializeToString()) for i in (0, 2, 3, 1)]
                del dims[:]
                dims.extend(permuted)
            return value

        entering = [t for t in cut.live if t in self._channels_last]
        leaving = [t for t in dict.fromkeys(t for c in later_cuts for t in c.live) if t != self.output]
        layout = [helper.make_node("Transpose", [self._boundary(t)], [t], perm=[0, 3, 1, 2]) for t in entering]
        layout_out = [helper.make_node("Transpose", [t], [self._boundary(t)], perm=[0, 2, 3, 1]) for t in leaving if t in self._channels_last]
        del graph.node[:]
        graph.node.extend(layout + keep + layout_out)
        inputs = [crossing(t) for t in cut.live]
        inputs += [i for i in self.template.graph.input if i.name in used and i.name not in cut.live]
        del graph.input[:]
        graph.input.extend(inputs)
        outputs = [o for o in graph.output if o.name == self.output] + [crossing(t) for t in leaving]
        del graph.output[:]
        graph.output.extend(outputs)
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        return self._with_numbers(model)


def _spread(items: list) -> list:
    """At most MAX_CUTS of ``items``, evenly spread: each cut holds a session (fed) and
    cached tensors."""
    if len(items) <= MAX_CUTS:
        return items
    return [items[round(i * (len(items) - 1) / (MAX_CUTS - 1))] for i in range(MAX_CUTS)]


def _feed(value: np.ndarray, dtype: int):
    """A feed for a fed Q/DQ tensor: numpy arrays as they are, 4-bit scalars as typed OrtValues."""
    if dtype in FOUR_BIT:
        if value.ndim:
            raise ValueError("only scalar 4-bit tensors are fed")  # weight codes are fed in 8-bit containers
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.astype(np.uint8 if dtype == onnx.TensorProto.UINT4 else np.int8), dtype)
    return value


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _timed_pass(sess: ort.InferenceSession, output: str, batches: list[dict[str, np.ndarray]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        sess.run([output], batch)
    return time.perf_counter() - started


def _rank(value: onnx.ValueInfoProto | None) -> int | None:
    shape = value.type.tensor_type.shape if value is not None else None
    return len(shape.dim) if shape is not None and value.type.tensor_type.HasField("shape") else None


def _offsets(batches: list[dict[str, np.ndarray]]) -> list[int]:
    out, at = [], 0
    for b in batches:
        out.append(at)
        at += len(next(iter(b.values())))
    return out


def _live_tensors(nodes: list[onnx.NodeProto], position: int, constants: set[str], output: str) -> list[str]:
    """Non-constant tensors made before ``position`` (or graph inputs) and read at or after it,
    plus the graph output when it is already made."""
    made_before = {o for n in nodes[:position] for o in n.output}
    made_anywhere = {o for n in nodes for o in n.output}
    read_after = dict.fromkeys(i for n in nodes[position:] for i in n.input)
    live = [t for t in read_after if t and t not in constants and (t in made_before or t not in made_anywhere)]
    if output in made_before and output not in live:
        live.append(output)
    return live
