"""Streaming per-tensor statistics in bounded memory: exact min/max and a histogram.

The histogram covers [-R, R) with ``2 * half_bins`` equal bins, where R is a power of
two.  When a batch exceeds R, R doubles and adjacent bin pairs merge, which is exact,
so the histogram never needs the data twice and memory never grows with the number
of samples.  Two histograms merge exactly by coarsening the finer one.
"""
from __future__ import annotations

import math

import numpy as np


def _pow2_at_least(value: float) -> float:
    if not value > 0 or not math.isfinite(value):
        return 1.0
    return float(2.0 ** math.ceil(math.log2(value)))


class TensorStats:
    """Observer of one tensor: count, exact zeros, min, max and a symmetric power-of-two
    histogram."""

    def __init__(self, half_bins: int = 2048):
        self.half_bins = half_bins
        self.count = 0
        self.zeros = 0
        self.min = math.inf
        self.max = -math.inf
        self.radius = 0.0
        self.counts = np.zeros(2 * half_bins, np.int64)

    def update(self, x: np.ndarray) -> None:
        """Fold a batch of values into the statistics."""
        x = np.asarray(x, np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.count += x.size
        self.zeros += int(np.count_nonzero(x == 0))
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self._grow_to(max(-lo, hi))
        width = self.radius / self.half_bins
        idx = np.floor(x.astype(np.float64) / width).astype(np.int64) + self.half_bins
        np.clip(idx, 0, 2 * self.half_bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=2 * self.half_bins)

    def merge(self, other: "TensorStats") -> "TensorStats":
        """A new observer holding the statistics of both (same bin count)."""
        if other.half_bins != self.half_bins:
            raise ValueError("cannot merge histograms with different bin counts")
        out = TensorStats(self.half_bins)
        out.count = self.count + other.count
        out.zeros = self.zeros + other.zeros
        out.min, out.max = min(self.min, other.min), max(self.max, other.max)
        out.radius = max(self.radius, other.radius)
        out.counts = self._counts_at(out.radius) + other._counts_at(out.radius)
        return out

    def _grow_to(self, absmax: float) -> None:
        target = _pow2_at_least(absmax)
        if self.radius == 0.0:
            self.radius = target
        elif target > self.radius:
            self.counts = self._counts_at(target)
            self.radius = target

    def _counts_at(self, radius: float) -> np.ndarray:
        """Counts re-binned onto [-radius, radius) (radius >= self.radius, both powers of two).

        A growth beyond the bin count puts every old value into the two bins beside 0.
        """
        if self.radius == 0.0 or radius == self.radius:
            return self.counts.copy()
        n = self.half_bins
        group = min(int(round(radius / self.radius)), n)
        neg = self.counts[:n][::-1].reshape(-1, group).sum(axis=1)
        pos = self.counts[n:].reshape(-1, group).sum(axis=1)
        out = np.zeros(2 * n, np.int64)
        out[n - neg.size:n] = neg[::-1]
        out[n:n + pos.size] = pos
        return out

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, 2 * half_bins + 1 values from -radius to radius."""
        return np.linspace(-self.radius, self.radius, 2 * self.half_bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2
