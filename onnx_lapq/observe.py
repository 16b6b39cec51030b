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
  * ``channel_mean``: the mean of each channel (axis 1), E[x_c], which bias correction needs.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping, Protocol

import numpy as np
import onnx
import onnxruntime as ort

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
    "range": lambda *, half_bins: RangeObserver(half_bins),
    "channel_mean": lambda *, half_bins: ChannelMean(),
}


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
    observers = {t: {k: OBSERVERS[k](half_bins=half_bins) for k in sorted(kinds)} for t, kinds in requests.items() if kinds}
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


def _run(sess: ort.InferenceSession | None, tensors: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    if sess is None:
        return []
    try:
        return sess.run(tensors, feeds)
    except Exception as exc:  # ORT raises its own exception types
        raise CalibrationError(f"ONNX Runtime could not run the model on the calibration data: {exc}".splitlines()[0]) from None
