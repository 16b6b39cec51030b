"""The inputs of layers in the float model and in the model quantized so far, as Gram statistics.

Sequential reconstruction needs, for each layer, its input x in the float model and x̂ in the
model whose earlier layers are already quantized.  :class:`InputCollector` runs both models over
the calibration batches once per wave of layers and folds each batch's patches (unfold.py) into
a :class:`LayerGram`: memory is one batch's tensors plus d × d per layer, whatever the number
of samples.

ONNX Runtime runs every node of a graph whatever outputs are asked for, so each run uses the
part of the model that computes what is asked (:func:`prefix`).  Waves go front to back, and
what comes before a wave's first layer is final when the wave runs (only that layer's and
later layers' weights change afterwards): the tensors alive there (the wave's *frontier*) are
kept for every batch while they fit ``cache_bytes``, and the next wave runs only the graph
between the two frontiers.  Where they do not fit, the next wave runs from the graph inputs.

Where a layer's input has more patches than it samples over all samples (``max_columns``, and
at most COLUMNS_PER_INPUT times its patch length d: a d × d Gram needs samples in proportion to
d), each batch contributes a seeded uniform random sample of its positions in proportion to its
rows; the patch means, which statistics correction needs exactly, always use every position.

With ``held_out``, every held_out-th entry along a layer input's first dimension (counted over
the batches) goes to a second set of statistics, kept out of the fit, on which the
reconstruction checks that its weights generalize.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from .cuts import live_tensors
from .runtime import session
from .unfold import LayerShape

COLUMNS_PER_INPUT = 1024  # patches sampled per column of a layer's patch, at most


def prefix(model: onnx.ModelProto, outputs: Iterable[str], given: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs``, from the graph inputs and, where given,
    from the tensors of ``given`` (name -> a value, whose type and rank the new input takes:
    batches may differ in every dimension, as sequences do in length)."""
    graph = model.graph
    given = given or {}
    wanted = list(dict.fromkeys(outputs))
    needed = set(wanted)
    nodes = []
    for node in reversed(graph.node):
        made = needed.intersection(node.output)
        if made and not made <= set(given):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    nodes.reverse()
    made_inside = {o for n in nodes for o in n.output}
    inputs = [i for i in graph.input if i.name in needed and i.name not in given] + [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), [None] * value.ndim)
        for name, value in given.items() if name in needed and name not in made_inside
    ]
    kept = helper.make_graph(
        nodes, graph.name, inputs, [helper.make_empty_tensor_value_info(name) for name in wanted],
        [t for t in graph.initializer if t.name in needed], value_info=[v for v in graph.value_info if v.name in needed],
    )
    out = helper.make_model(kept, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def frontier_tensors(model: onnx.ModelProto, node_name: str) -> list[str]:
    """The tensors alive across node ``node_name`` (cuts.live_tensors) that the graph makes,
    graph inputs left out (each batch has them), and tensors made from initializers alone (such
    as a dequantized weight, which a later wave may change) counted as constants."""
    nodes = list(model.graph.node)
    position = next(i for i, n in enumerate(nodes) if n.name == node_name)
    constant = {t.name for t in model.graph.initializer}
    for node in nodes:
        if all(not i or i in constant for i in node.input):
            constant.update(node.output)
    made = {o for n in nodes for o in n.output}
    return [t for t in live_tensors(nodes, position, constant) if t in made]


@dataclass
class LayerGram:
    """Running Gram statistics of one layer's patches: x̂ (quantized model) and x (float).

    hessian = E[x̂ x̂ᵀ], cross = E[x̂ xᵀ], float_hessian = E[x xᵀ] over the sampled patches
    ([G, d, d]; products in float32, sums in float64); quantized_mean = E[x̂], float_mean = E[x]
    over every patch ([G, d]).  cross is kept as hessian + E[x̂ (x − x̂)ᵀ]: at 8 bits x and x̂
    differ by a fraction of a percent, and C − Ĥ, which the solvers read, would drown in the
    float32 rounding of C and Ĥ taken apart."""

    layer: LayerShape
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    sampled: int = 0
    positions: int = 0

    def update(self, quantized: np.ndarray, floating: np.ndarray, chosen: np.ndarray) -> None:
        pq = self.layer.patches(quantized, chosen)
        pf = self.layer.patches(floating, chosen)
        pq_t = pq.transpose(0, 2, 1)
        moments = {
            "hessian": np.matmul(pq_t, pq), "shift": np.matmul(pq_t, pf - pq), "float_hessian": np.matmul(pf.transpose(0, 2, 1), pf),
            "quantized_mean": self.layer.patch_sum(quantized), "float_mean": self.layer.patch_sum(floating),
        }
        for key, value in moments.items():
            value = value.astype(np.float64)
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.sampled += len(chosen)
        self.positions += self.layer.positions(quantized)

    def output_shift(self, weight: np.ndarray, fitted: np.ndarray) -> np.ndarray:
        """W E[x] − Ŵ E[x̂], flattened: what a bias must add so that the layer with ``fitted``
        ([G, r, d]) on its inputs x̂ has the mean output of ``weight`` on x."""
        return (np.matmul(weight, self.mean("float_mean")[:, :, None]) - np.matmul(fitted, self.mean("quantized_mean")[:, :, None])).ravel()

    def mean(self, key: str) -> np.ndarray:
        """One of the statistics named in the class docstring."""
        if key == "cross":
            return self.mean("hessian") + self.mean("shift")
        count = self.positions if key.endswith("_mean") else self.sampled
        return self.sums[key] / max(count, 1)


def _entries(x: np.ndarray, part: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The entries ``part`` of ``x`` along its first dimension, at the real positions of ``mask`` where given."""
    if not part.all():
        x, mask = x[part], None if mask is None else mask[part]
    return x if mask is None else x[mask]


@dataclass(frozen=True)
class LayerInput:
    """A layer to collect: its node, its shape, and its input tensor in the float and in the quantized model."""

    node: str
    layer: LayerShape
    float_tensor: str
    quantized_tensor: str


@dataclass
class _Frontier:
    """The values, per batch, of the tensors alive before one node of a model (None: not kept)."""

    values: list[dict[str, np.ndarray]] | None = None


class InputCollector:
    """Collects :class:`LayerGram` statistics wave by wave over ``batches`` (see the module docstring)."""

    def __init__(self, float_model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], *, max_columns: int, seed: int,
                 mask_input: str | None = None, cache_bytes: int = 1 << 30, held_out: int = 0):
        self.float_model = float_model
        self.held_out = held_out
        self.batches = batches
        self.max_columns = max_columns
        self.seed = seed
        self.mask_input = mask_input
        self.cache_bytes = cache_bytes
        self.frontiers = {"float": _Frontier(), "quantized": _Frontier()}
        self.total = sum(len(next(iter(b.values()))) for b in batches)

    def collect(self, quantized_model: onnx.ModelProto, wanted: list[LayerInput]) -> list[tuple[LayerGram, LayerGram]]:
        """The statistics of ``wanted`` (a wave, its layers in graph order) with ``quantized_model``,
        keeping the frontier before its first layer: per layer, (fit, held out), the latter of
        every ``held_out``-th entry along the input's first dimension (empty without held_out)."""
        runs = {
            side: self._outputs(side, model, [getattr(w, f"{side}_tensor") for w in wanted], wanted[0].node)
            for side, model in (("float", self.float_model), ("quantized", quantized_model))
        }
        grams = [(LayerGram(w.layer), LayerGram(w.layer)) for w in wanted]
        rngs = {w.node: np.random.default_rng([self.seed, *w.node.encode()]) for w in wanted}
        seen = dict.fromkeys(rngs, 0)  # entries along each input's first dimension so far
        for index, batch in enumerate(self.batches):
            rows = len(next(iter(batch.values())))
            got = {side: run(index, batch) for side, run in runs.items()}
            mask = np.asarray(batch[self.mask_input]).astype(bool) if self.mask_input and self.mask_input in batch else None
            for position, ((fit, held), layer) in enumerate(zip(grams, wanted)):
                x, x_hat = got["float"][position], got["quantized"][position]
                masked = mask is not None and x.ndim >= 3 and x.shape[:2] == mask.shape and layer.layer.op_type != "Conv"
                quota = -(-min(self.max_columns, COLUMNS_PER_INPUT * layer.layer.columns) * rows // self.total)
                entries = np.arange(len(x)) + seen[layer.node]
                seen[layer.node] += len(x)
                out = entries % self.held_out == self.held_out - 1 if self.held_out else np.zeros(len(x), bool)
                for gram, part in ((fit, ~out), (held, out)):
                    if not part.any():
                        continue
                    xs, xs_hat = _entries(x, part, mask if masked else None), _entries(x_hat, part, mask if masked else None)
                    positions = layer.layer.positions(xs)
                    share = -(-quota * int(part.sum()) // len(x))
                    chosen = np.arange(positions) if positions <= share else np.sort(rngs[layer.node].choice(positions, share, replace=False))
                    gram.update(xs_hat, xs, chosen)
        return grams

    def _outputs(self, side: str, model: onnx.ModelProto, tensors: list[str], first_node: str):
        """A function (batch index, batch) -> the values of ``tensors``, which also stores the
        frontier before ``first_node`` where it fits."""
        frontier = self.frontiers[side]
        given = frontier.values[0] if frontier.values else None
        keep = frontier_tensors(model, first_node)
        sess = session(prefix(model, tensors + keep, given), arena="none")
        feeds = [i.name for i in sess.get_inputs()]
        old = frontier.values
        frontier.values = None
        stored: list[dict[str, np.ndarray]] | None = [] if keep else None

        def run(index: int, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
            nonlocal stored
            known = {**batch, **(old[index] if old else {})}
            values = sess.run(tensors + keep, {name: known[name] for name in feeds})
            if stored is not None:
                stored.append(dict(zip(keep, values[len(tensors):])))
                rows = len(next(iter(batch.values())))
                if sum(v.nbytes for v in stored[-1].values()) * self.total / rows > self.cache_bytes / 2:  # half for each model
                    stored = None
                elif index == len(self.batches) - 1:
                    frontier.values = stored
            return values[:len(tensors)]

        return run


def waves(model: onnx.ModelProto, sites: list) -> list[list]:
    """``sites`` (weight sites, in graph order) in runs whose layers' inputs do not depend on
    each other: a wave's inputs are collected in one pass."""
    producer = {o: n for n in model.graph.node for o in n.output}
    layer_of = {s.node: s for s in sites}
    upstream: dict[str, frozenset[str]] = {}

    def layers_above(tensor: str) -> frozenset[str]:
        stack, seen, found = [tensor], set(), set()
        while stack:
            name = stack.pop()
            if name in upstream:
                found |= upstream[name]
                continue
            node = producer.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.name in layer_of:
                found.add(node.name)
            stack.extend(i for i in node.input if i)
        return frozenset(found)

    waves: list[list] = []
    members: set[str] = set()
    nodes = {n.name: n for n in model.graph.node}
    for site in sites:
        above = layers_above(nodes[site.node].input[0])
        upstream[nodes[site.node].input[0]] = above
        if not waves or above & members:
            waves.append([])
            members = set()
        waves[-1].append(site)
        members.add(site.node)
    return waves
