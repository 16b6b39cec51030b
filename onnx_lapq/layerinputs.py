"""The inputs of layers in the float model and in the model quantized so far, as Gram statistics.

Sequential reconstruction needs, for each layer, its input x in the float model and x̂ in the
model whose earlier layers are already quantized.  :func:`collect` runs both models, cut down
to the part that computes the requested inputs (:func:`prefix`: ONNX Runtime runs every node of
a graph whatever outputs are asked for), over the calibration batches once, and folds each
batch's patches (unfold.py) into a :class:`LayerGram`; memory is one batch's tensors plus
d × d per layer, whatever the number of samples.

Where a layer's input has more patches than ``max_columns`` over all samples, each batch
contributes a seeded uniform random sample of its positions in proportion to its rows; the
patch means, which statistics correction needs exactly, always use every position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx

from .runtime import session
from .unfold import LayerShape


def prefix(model: onnx.ModelProto, outputs: Iterable[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (float32 graph outputs), inputs and
    initializers it does not read left out."""
    graph = model.graph
    wanted = list(outputs)
    needed = set(wanted)
    nodes = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    nodes.reverse()
    kept = onnx.helper.make_graph(
        nodes, graph.name, [i for i in graph.input if i.name in needed],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in wanted],
        [t for t in graph.initializer if t.name in needed],
        value_info=[v for v in graph.value_info if v.name in needed],
    )
    out = onnx.helper.make_model(kept, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


@dataclass
class LayerGram:
    """Running Gram statistics of one layer's patches: x̂ (quantized model) and x (float).

    hessian = E[x̂ x̂ᵀ], cross = E[x̂ xᵀ], float_hessian = E[x xᵀ] over the sampled patches
    ([G, d, d]); quantized_mean = E[x̂], float_mean = E[x] over every patch ([G, d])."""

    layer: LayerShape
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    sampled: int = 0
    positions: int = 0

    def update(self, quantized: np.ndarray, floating: np.ndarray, chosen: np.ndarray) -> None:
        pq, pf = self.layer.patches(quantized, chosen), self.layer.patches(floating, chosen)
        moments = {
            "hessian": np.matmul(pq.transpose(0, 2, 1), pq), "cross": np.matmul(pq.transpose(0, 2, 1), pf),
            "float_hessian": np.matmul(pf.transpose(0, 2, 1), pf),
            "quantized_mean": self.layer.patch_sum(quantized), "float_mean": self.layer.patch_sum(floating),
        }
        for key, value in moments.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.sampled += len(chosen)
        self.positions += self.layer.positions(quantized)

    def mean(self, key: str) -> np.ndarray:
        """One of the statistics named in the class docstring."""
        count = self.positions if key.endswith("_mean") else self.sampled
        return self.sums[key] / max(count, 1)


@dataclass(frozen=True)
class LayerInput:
    """A layer to collect: its shape, and its input tensor in the float and in the quantized model."""

    layer: LayerShape
    float_tensor: str
    quantized_tensor: str


def collect(
    float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, wanted: list[LayerInput],
    batches: list[dict[str, np.ndarray]], *, max_columns: int, seed: int, mask_input: str | None = None,
) -> list[LayerGram]:
    """One pass of both models over ``batches`` for the layer inputs ``wanted``."""
    float_sess = session(prefix(float_model, [w.float_tensor for w in wanted]), arena="none")
    quant_sess = session(prefix(quantized_model, [w.quantized_tensor for w in wanted]), arena="none")
    feeds_of = {s: {i.name for i in s.get_inputs()} for s in (float_sess, quant_sess)}
    total = sum(len(next(iter(b.values()))) for b in batches)
    grams = [LayerGram(w.layer) for w in wanted]
    rngs = [np.random.default_rng([seed, i]) for i in range(len(wanted))]
    for batch in batches:
        rows = len(next(iter(batch.values())))
        floats = float_sess.run([w.float_tensor for w in wanted], {k: v for k, v in batch.items() if k in feeds_of[float_sess]})
        quants = quant_sess.run([w.quantized_tensor for w in wanted], {k: v for k, v in batch.items() if k in feeds_of[quant_sess]})
        mask = np.asarray(batch[mask_input]).astype(bool) if mask_input and mask_input in batch else None
        for gram, rng, x, x_hat in zip(grams, rngs, floats, quants):
            if mask is not None and x.ndim >= 3 and x.shape[:2] == mask.shape and gram.layer.op_type != "Conv":
                x, x_hat = x[mask], x_hat[mask]
            positions = gram.layer.positions(x)
            quota = -(-max_columns * rows // total)
            chosen = np.arange(positions) if positions <= quota else np.sort(rng.choice(positions, quota, replace=False))
            gram.update(x_hat, x, chosen)
    return grams
