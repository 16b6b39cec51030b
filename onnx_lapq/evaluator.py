"""The end-to-end calibration loss of candidate quantization parameters, through ONNX Runtime.

    loss(params) = mean over calibration samples of d(f_fp32(x), f_q(x; params))

with d from distance.py; the FP32 reference is computed once.  Three ways to run the quantized
graph, the first two chosen by structure so that the machine's load never changes the mode or the model:
  * fed (any sub-8-bit site, which no CPU kernel fuses, or cuts too shallow for fused): the
    Q/DQ numbers are graph inputs (export.py's fed export), so one session per graph suffix
    serves every candidate, and ONNX Runtime fuses every suffix as it fuses the exported
    model (cuts.py's rules): the loss is the same bit for bit from any cut;
  * fused (every grid one ONNX Runtime fuses: ops.fuses_to_integer, when cuts where only integer codes cross skip
    enough of the graph: cuts.GraphCuts.fused_cuts_are_fine): the numbers are constants, as
    in the exported model, so ONNX Runtime runs its integer kernels; each evaluation builds
    and opens a session for the suffix it runs, still cheaper than float fake-quant.
  * fed at any widths (``any_widths``, for sensitivity probes): every weight is a float
    graph input, fake-quantized in numpy, and every activation's codes sit in an 8-bit
    container behind a Clip to its grid, so one session takes any weight and activation at
    any width; its layers run in float.
All these sessions draw on runtime.py's shared memory arena: an arena per fed suffix costs
memory in proportion to the number of cuts, no arena makes every run fetch fresh memory, and
a fused session's own arena would start empty at every evaluation.
Fed, sub-8-bit activations that only convolutions read travel in 8-bit containers
(``grouping.carried_in_bytes``): the same values, faster kernels.  Either way an evaluation runs
up to MAX_CONCURRENT_BATCHES calibration batches at once, each session on cores / workers
threads: ONNX Runtime's DequantizeLinear runs on one thread whatever the session's setting,
and the kernels give the same bits on one thread as on several.
An evaluation recomputes the Q/DQ numbers of the sites whose parameters changed, bumping
their versions, and runs only the graph after the deepest cut whose upstream versions are
those its cached tensors were computed under.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .cuts import Cut, GraphCuts
from .distance import distance, outputs_probabilities, resolve_loss
from .errors import ConfigError
from .export import FOUR_BIT, export_qdq, proto, qdq_tensors
from .largemodel import copy_model
from .params import QParams
from .grouping import carried_in_bytes
from .ops import fuses_to_integer
from .options import LOSSES
from .plan import QuantPlan
from .runtime import cores, quantized_session, session
from .solution import Solution

FP32_TIMINGS = 3  # warm FP32 passes timed before the search ...
FP32_EVERY = 50  # ... and one more after every 50th evaluation, so that both see the same machine load
MAX_CONCURRENT_BATCHES = 2  # calibration batches an evaluation runs at once, each on cores // workers threads


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
        any_widths: bool = False,
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
        self.any_widths = any_widths  # every weight fed in float and every activation clipped: any widths (fed only)
        self.fused = False if any_widths else fuses_to_integer(*(a.bits for a in plan.activations), *(w.bits for w in plan.weights)) if fused is None else fused
        self._build(model, init_params)
        if fused is None and self.fused and not self._graph_cuts.fused_cuts_are_fine():
            self.fused = False
            self._build(model, init_params)
        self.cuts = self._graph_cuts.choose(self._tensor_bytes(), list(batches[0]), memory_budget)
        available = cores()
        self._workers = min(len(batches), MAX_CONCURRENT_BATCHES, available)
        self._threads = max(1, available // self._workers)
        self._pool = ThreadPoolExecutor(self._workers)  # its threads end when the evaluator is collected
        self._fed_sessions = [] if self.fused else [self._suffix_session(c, self._graph_cuts.refreshed_after(i)) for i, c in enumerate(self.cuts)]
        self.evaluations = 0
        self.suffix_nodes = 0
        self.eval_seconds = 0.0

    def _build(self, model: onnx.ModelProto, init_params: dict[str, QParams]) -> None:
        """The QDQ template of the current mode, its Q/DQ numbers at ``init_params``, the value
        info of every tensor and the template's cuts."""
        self.template = export_qdq(model, self.plan, init_params, self.solution, fed=not self.fused, any_widths=self.any_widths)
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
        self._graph_cuts = GraphCuts(self.template, self._types, set(self._raw), self.output, self.fused)

    def _suffix_session(self, cut: Cut, later: list[Cut]) -> ort.InferenceSession:
        """A session of the graph after ``cut`` with the current numbers (see runtime.quantized_session)."""
        return quantized_session(
            self.suffix(cut, later), "the quantized model the search evaluates", threads=self._threads, arena="shared",
            advice="; other bit-widths, or --exclude on the layers its message names, may avoid it",
        )

    # ----------------------------------------------------------------- public
    def __call__(self, params: dict[str, QParams]) -> float:
        started = time.perf_counter()
        self._update(params)
        start = self._deepest_valid_cut()
        cut = self.cuts[start]
        later = self._graph_cuts.refreshed_after(start)
        sess = self._suffix_session(cut, later) if self.fused else self._fed_sessions[start]
        boundary = self._graph_cuts.boundary
        names = [self.output] + [boundary(t) for c in later for t in c.live]
        fed = {i.name: self._feeds[i.name] for i in sess.get_inputs() if i.name in self._feeds}

        def run(b: int) -> tuple[float, list]:
            feeds = dict(fed)
            feeds.update(zip(map(boundary, cut.live), cut.values[b]) if cut.values is not None else self.batches[b].items())
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

    def suffix(self, cut: Cut, later: list[Cut]) -> onnx.ModelProto:
        """The quantized graph from ``cut`` on with the current Q/DQ numbers, returning the
        output and ``later``'s live tensors, as an evaluation from ``cut`` runs it."""
        return self._with_numbers(self._graph_cuts.suffix(cut, later))

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

    def use(self, solution: Solution, tensors: frozenset[str] | None = None) -> None:
        """Evaluate ``solution``'s weights and biases from now on (e.g. with bias correction
        switched on or off); the Q/DQ numbers of ``tensors`` (those where the solution differs;
        None: every site) are recomputed at the next evaluation."""
        self.solution = solution
        if tensors is None:
            self._site_params = {}
        for name in tensors or ():
            self._site_params.pop(name, None)

    # ----------------------------------------------------------------- Q/DQ numbers
    def _update(self, params: dict[str, QParams]) -> None:
        """Recompute the Q/DQ tensors of sites whose parameters changed; bump their versions."""
        changed = set()
        for name, qp in params.items():
            key = (qp.scale.tobytes(), qp.zero_point.tobytes(), qp.fmt)
            if self._site_params.get(name) != key:
                self._site_params[name] = key
                changed.add(name)
        if not changed:
            return
        if self.solution.input_means:  # a corrected bias moves with its weight's grid, even where its own scale does not
            changed |= {b.tensor for b in self.plan.biases if b.weight_tensor in changed}
        for name, (value, dtype) in qdq_tensors(self.solution, self.plan, params, fed=True, sites=changed,
                                                any_widths=self.any_widths).items():
            old = self._raw.get(name)
            if old is None or old[0].shape != value.shape or not np.array_equal(old[0], value):
                self._raw[name] = (value, dtype)
                if not self.fused:
                    self._feeds[name] = _feed(value, dtype)
                self._version[name] = self._version.get(name, 0) + 1

    def _versions(self, cut: Cut) -> tuple:
        return tuple(self._version.get(n, 0) for n in cut.upstream)

    def _deepest_valid_cut(self) -> int:
        for i in range(len(self.cuts) - 1, 0, -1):
            c = self.cuts[i]
            if c.values is not None and c.versions == self._versions(c):
                return i
        return 0

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


def _feed(value: np.ndarray, dtype: int):
    """A feed for a fed Q/DQ tensor: numpy arrays as they are, 4-bit scalars as typed OrtValues."""
    if dtype in FOUR_BIT:
        if value.ndim:
            raise ValueError("only scalar 4-bit tensors are fed")  # weight codes are fed in 8-bit containers
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.astype(np.uint8 if dtype == onnx.TensorProto.UINT4 else np.int8), dtype)
    return value


def _timed_pass(sess: ort.InferenceSession, output: str, batches: list[dict[str, np.ndarray]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        sess.run([output], batch)
    return time.perf_counter() - started


def _offsets(batches: list[dict[str, np.ndarray]]) -> list[int]:
    out, at = [], 0
    for b in batches:
        out.append(at)
        at += len(next(iter(b.values())))
    return out
