"""Observers of the float model's tensors, fed by one streaming ONNX Runtime pass over the
calibration data.

A method asks for what it needs as a mapping ``tensor -> observer kinds``; :func:`observe`
runs the float model once with every requested tensor added as a graph output, hands each
batch's value of a tensor to that tensor's observers and drops it.  Memory is therefore one
run's outputs plus each observer's fixed-size state, whatever the number of samples; and,
since every observer only accumulates, the results do not depend on how the samples are
split into batches or runs (up to the order of float additions).

An observer is a small class with ``update(values)`` and ``result()``, registered by kind in
:data:`OBSERVERS`:

  * ``range``: count, exact min/max and a power-of-two histogram (:class:`stats.TensorStats`);
  * ``weighted_range``: the same with each value counted by the weight its channel has in the
    layers that read the tensor, Σ over their weights of w² along that input channel (an
    error in a channel reaches their outputs scaled so; the channel axis is 1 for a
    convolution's input, last for a Gemm's or MatMul's; weight 1 where no layer with a
    constant weight reads the tensor);
  * ``channel_mean``: the mean of each channel (axis 1), E[x_c], which bias correction needs.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import CalibrationError, ConfigError
from .runtime import session
from .stats import TensorStats

OUTPUT_BUDGET = 128 << 20  # bytes of observed tensors one ONNX Runtime run may return


class Observer(Protocol):
    """Folds the values of one tensor, a run at a time, into a result of bounded size."""

    def update(self, values: np.ndarray) -> None: ...

    def result(self) -> Any: ...


class RangeObserver:
    """``range``: the tensor's :class:`TensorStats` (min/max and histogram of every value)."""

    def __init__(self, half_bins: int):
        self.stats = TensorStats(half_bins)

    def update(self, values: np.ndarray) -> None:
        self.stats.update(values)

    def result(self) -> TensorStats:
        return self.stats


class WeightedRangeObserver:
    """``weighted_range``: a weighted :class:`TensorStats`, each value counted by its channel's weight."""

    def __init__(self, half_bins: int, weights: tuple[int, np.ndarray] | None):
        self.stats = TensorStats(half_bins, weighted=True)
        self.axis, self.weights = weights if weights is not None else (-1, np.ones(1))

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float32)
        shape = [1] * x.ndim
        if x.ndim and self.weights.size == x.shape[self.axis]:
            shape[self.axis] = -1
        self.stats.update(x, self.weights.reshape(shape) if -1 in shape else np.ones(1))

    def result(self) -> TensorStats:
        return self.stats


class ChannelMean:
    """``channel_mean``: the mean of each channel along axis 1, from float64 sums of the
    float32 values (None when no value with a channel axis was seen)."""

    AXIS = 1

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float32)
        if x.ndim > self.AXIS and x.size:
            sums = x.sum(axis=tuple(i for i in range(x.ndim) if i != self.AXIS), dtype=np.float64)
            self.sums = sums if self.sums is None else self.sums + sums
            self.count += x.size // x.shape[self.AXIS]

    def result(self) -> np.ndarray | None:
        return None if self.sums is None else self.sums / max(self.count, 1)


# kind -> factory; every factory takes the pass's options as keywords and uses what it needs
OBSERVERS: Mapping[str, Callable[..., Observer]] = {
    "range": lambda *, half_bins, weights: RangeObserver(half_bins),
    "weighted_range": lambda *, half_bins, weights: WeightedRangeObserver(half_bins, weights),
    "channel_mean": lambda *, half_bins, weights: ChannelMean(),
}
WEIGHTED = "weighted_range"
CHANNEL_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": -1, "MatMul": -1}  # a layer input's channel axis


class Observations:
    """What :func:`observe` saw: ``samples``, and each requested (tensor, kind)'s result."""

    def __init__(self, observers: dict[str, dict[str, Observer]], samples: int):
        self._observers = observers
        self.samples = samples

    def get(self, kind: str, tensor: str) -> Any:
        """The result of observer ``kind`` of ``tensor``; KeyError if it was not requested."""
        observers = self._observers.get(tensor, {})
        if kind not in observers:
            raise KeyError(f"no {kind!r} observer of tensor {tensor!r} was requested")
        return observers[kind].result()

    def of_kind(self, kind: str) -> dict[str, Any]:
        """tensor -> result, for every tensor with a ``kind`` observer, in request order."""
        return {t: observers[kind].result() for t, observers in self._observers.items() if kind in observers}

    def merged(self, other: "Observations") -> "Observations":
        """These observations with ``other``'s (of the same samples) added."""
        observers = {t: dict(kinds) for t, kinds in self._observers.items()}
        for tensor, kinds in other._observers.items():
            observers.setdefault(tensor, {}).update(kinds)
        return Observations(observers, self.samples)

    def requested(self, tensor: str, kind: str) -> bool:
        """Whether ``kind`` of ``tensor`` was observed."""
        return kind in self._observers.get(tensor, {})

    def range(self, tensor: str) -> TensorStats:
        return self.get("range", tensor)

    def channel_mean(self, tensor: str) -> np.ndarray | None:
        return self.get("channel_mean", tensor)


def observe(
    model: onnx.ModelProto,
    requests: Mapping[str, Collection[str]],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    half_bins: int,
    mask_input: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Observations:
    """Run ``model`` once over ``batches`` and feed each tensor of ``requests`` to observers of
    the kinds requested for it.

    Each run returns at most about OUTPUT_BUDGET bytes of observed tensors (its number of
    samples is set from a first run of one sample).  With ``mask_input`` (a [batch, sequence]
    input, nonzero at real positions), a tensor whose leading dimensions are [batch, sequence]
    is observed at real positions only, so padding does not widen its range.
    ``on_batch(samples_so_far)`` is called after each batch.
    """
    unknown = sorted({k for kinds in requests.values() for k in kinds} - set(OBSERVERS))
    if unknown:
        raise ConfigError(f"observer kind {unknown[0]!r} is unknown: use one of {', '.join(OBSERVERS)}")
    weights = consumer_weights(model, [t for t, kinds in requests.items() if WEIGHTED in kinds])
    observers = {t: {k: OBSERVERS[k](half_bins=half_bins, weights=weights.get(t)) for k in sorted(kinds)} for t, kinds in requests.items() if kinds}
    tensors = list(observers)
    sess = session(model, outputs=tensors, arena="none") if tensors else None  # run sizes vary: no arena growth
    done, rows_per_run = 0, 1  # the first run is one sample, to learn how much one returns
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        mask = np.asarray(batch[mask_input]).astype(bool) if mask_input else None
        start = 0
        while start < rows:
            step = rows_per_run
            outputs = _run(sess, tensors, {k: v[start:start + step] for k, v in batch.items()})
            if done == 0 and start == 0 and outputs:
                rows_per_run = max(1, int(OUTPUT_BUDGET // max(sum(o.nbytes for o in outputs), 1)))
            chunk_mask = None if mask is None else mask[start:start + step]
            for name, value in zip(tensors, outputs):
                if chunk_mask is not None and value.ndim >= 2 and value.shape[:2] == chunk_mask.shape:
                    value = value[chunk_mask]
                for observer in observers[name].values():
                    observer.update(value)
            start += step
        done += rows
        if on_batch is not None:
            on_batch(done)
    return Observations(observers, done)


def consumer_weights(model: onnx.ModelProto, tensors: Collection[str]) -> dict[str, tuple[int, np.ndarray]]:
    """tensor -> (its channel axis, each channel's Σ w² over the constant weights of the layers
    that read it as their first input), for those of ``tensors`` that such layers read."""
    wanted = set(tensors)
    constants = {t.name: t for t in model.graph.initializer}
    out: dict[str, tuple[int, np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type not in CHANNEL_AXIS or not node.input or node.input[0] not in wanted or len(node.input) < 2 or node.input[1] not in constants:
            continue
        per_channel = _input_channel_weights(node, numpy_helper.to_array(constants[node.input[1]]).astype(np.float64) ** 2)
        if per_channel is None:
            continue
        axis = CHANNEL_AXIS[node.op_type]
        old = out.get(node.input[0])
        if old is None:
            out[node.input[0]] = (axis, per_channel)
        elif old[0] == axis and old[1].shape == per_channel.shape:
            out[node.input[0]] = (axis, old[1] + per_channel)
    return out


def _input_channel_weights(node: onnx.NodeProto, squares: np.ndarray) -> np.ndarray | None:
    """Σ w² along each input channel of a layer's squared weight (None for another op or form)."""
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if node.op_type == "Gemm" and squares.ndim == 2 and not attrs.get("transA", 0):
        return squares.sum(axis=0 if attrs.get("transB", 0) else 1)
    if node.op_type == "MatMul" and squares.ndim >= 2:
        return squares.reshape(-1, *squares.shape[-2:]).sum(axis=(0, 2))
    if node.op_type == "Conv" and squares.ndim >= 3:  # [O, C/g, k...]: an output channel meets the inputs of its group only
        summed = squares.sum(axis=tuple(range(2, squares.ndim)))
        return summed.reshape(attrs.get("group", 1), -1, summed.shape[1]).sum(axis=1).ravel()
    if node.op_type == "ConvTranspose" and squares.ndim >= 3:  # [C, O/g, k...]
        return squares.sum(axis=tuple(range(1, squares.ndim)))
    return None


def _run(sess: ort.InferenceSession | None, tensors: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    if sess is None:
        return []
    try:
        return sess.run(tensors, feeds)
    except Exception as exc:  # ORT raises its own exception types
        raise CalibrationError(f"ONNX Runtime could not run the model on the calibration data: {exc}".splitlines()[0]) from None
