"""Clipping calibrators: choose the real range [lo, hi] of a site from its statistics.

Activations (from a streamed :class:`TensorStats` histogram):
  minmax      [min, max]
  percentile  [P(100-p), P(p)] of the value distribution (lo = 0 for non-negative data)
  entropy     TensorRT's KL rule on the |x| histogram: the threshold T minimizing
              KL(P_T || Q_T) with 2**(bits-1) levels (2**bits when x >= 0)
  mse, lp     alpha * [min, max] with alpha minimizing E|Q(x) - x|^p (p = 2 for mse),
              where values inside the range cost the uniform rounding error
              s^p / ((p + 1) 2^p) and values outside cost their distance to the bound
Weights (exactly, on the values): per channel, alpha * absmax minimizing the mean
|Q(w) - w|^p over a grid of alpha.
"""
from __future__ import annotations

import numpy as np

from .qmath import QFormat, fake_quantize, scale_zero_point, whole_blocks
from .stats import TensorStats

ALPHA_GRID = np.linspace(0.01, 1.0, 100)


def activation_range(stats: TensorStats, method: str, bits: int, *, percentile: float, p: float, symmetric: bool = False) -> tuple[float, float]:
    """The clipping range of one activation for ``method`` (see the module docstring)."""
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if method == "minmax" or hi == lo:
        return lo, hi
    if method == "percentile":
        return _percentile_range(stats, percentile)
    if method == "entropy":
        t = entropy_threshold(stats, bits)
        return max(lo, -t), min(hi, t)
    norm = 2.0 if method == "mse" else p
    alpha = ALPHA_GRID[int(np.argmin(lp_errors(stats, bits, norm, ALPHA_GRID, symmetric)))]
    return alpha * lo, alpha * hi


def activation_format(lo: float, bits: int, symmetric: bool) -> QFormat:
    """Unsigned grid for non-negative data, else signed (symmetric) or unsigned with zero point."""
    if lo >= 0:
        return QFormat(bits, signed=False, symmetric=symmetric)
    return QFormat(bits, signed=symmetric, symmetric=symmetric)


def lp_errors(stats: TensorStats, bits: int, p: float, alphas: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """E|Q(x) - x|^p from the histogram for each range alpha * [min, max]."""
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    fmt = activation_format(lo, bits, symmetric)
    counts = stats.counts.astype(np.float64)
    counts[stats.half_bins] -= stats.zeros  # exact zeros quantize without error
    centers, weights = stats.centers, counts / max(stats.counts.sum(), 1)
    errors = np.empty(len(alphas))
    for i, a in enumerate(alphas):
        scale, zp = scale_zero_point(a * lo, a * hi, fmt)
        s, z = float(scale), int(zp)
        lo_q, hi_q = (fmt.qmin - z) * s, (fmt.qmax - z) * s
        outside = np.maximum(centers - hi_q, 0.0) + np.maximum(lo_q - centers, 0.0)
        inside_cost = s**p / ((p + 1) * 2**p)
        errors[i] = float(np.sum(weights * np.where(outside > 0, outside**p, inside_cost)))
    return errors


def _percentile_range(stats: TensorStats, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(stats.counts) / max(stats.counts.sum(), 1)
    edges = stats.edges
    share = percentile / 100.0 - 1e-9  # 99.9 / 100 rounds above 0.999; do not skip to the next outlier
    hi = float(edges[1:][np.searchsorted(cdf, share)])
    lo = float(edges[:-1][np.searchsorted(cdf, 1.0 - share, side="right")]) if stats.min < 0 else 0.0
    return max(min(lo, 0.0), min(stats.min, 0.0)), min(max(hi, 0.0), stats.max)


def entropy_threshold(stats: TensorStats, bits: int) -> float:
    """TensorRT's KL-divergence threshold on the |x| histogram.

    For each candidate threshold (a bin edge i), P is the histogram up to i with the
    clipped tail added to its last bin, Q merges P's bins into 2**bits levels
    (2**(bits-1) for signed data) spread back over P's non-empty bins; T minimizes KL(P||Q).
    As in NVIDIA's calibrators, the first bin takes the count of the second.  Thresholds
    below which fewer than ``levels`` bins are non-empty are not tried: there Q copies P
    bin for bin and KL misses the clipping (integer-valued data such as an image input,
    one non-empty bin in eight, would otherwise be clipped to its first few values).
    """
    n = stats.half_bins
    hist = (stats.counts[n:] + stats.counts[:n][::-1]).astype(np.float64)
    hist[0] = hist[1]  # the spike of exact zeros (after ReLU) would otherwise dominate P
    levels = 2**bits if stats.min >= 0 else 2 ** (bits - 1)
    last = int(np.nonzero(hist)[0].max()) + 1 if hist.any() else n
    width = stats.radius / n
    if last <= levels:
        return last * width
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    candidates = np.unique(np.linspace(levels, last, min(last - levels + 1, 512)).astype(int))
    candidates = candidates[np.cumsum(hist > 0)[candidates - 1] >= levels]
    if not len(candidates):
        return last * width
    divergences = [_kl_at(hist, tail, i, levels) for i in candidates]
    return float(candidates[int(np.argmin(divergences))] * width)


def _kl_at(hist: np.ndarray, tail: np.ndarray, i: int, levels: int) -> float:
    ref = hist[:i].copy()
    ref[-1] += tail[i]
    group = (np.arange(i) * levels) // i
    nonzero = hist[:i] > 0
    sums = np.bincount(group, weights=hist[:i], minlength=levels)
    counts = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
    p = ref / ref.sum()
    q = q / max(q.sum(), 1e-300)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def weight_range(
    weight: np.ndarray, axis: int | None, fmt: QFormat, method: str, p: float, block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clipping range (lo, hi) of a weight: per channel (``axis``), per tensor (None), or
    per block of ``block_size`` elements along ``axis`` (arrays shaped like the weight with
    that dimension divided into blocks).

    Symmetric formats clip at +-absmax, asymmetric ones at [min, max]; mse and lp
    shrink that range by the alpha minimizing the mean |Q(w) - w|^p of each group.
    """
    w = np.asarray(weight, np.float32)
    split = whole_blocks(w.shape, axis, block_size)
    if split is not None and method not in ("mse", "lp"):  # extremes straight off a view of the blocks
        lo, hi = _extremes(w.reshape(split), axis + 1, fmt)
        return lo.astype(np.float64), hi.astype(np.float64)
    if block_size is not None:
        blocks = _blocks(w, axis, block_size)  # [n_blocks, block, rest...]
        moved = np.moveaxis(blocks, 1, -1)
        lo, hi = _group_ranges(moved.reshape(-1, block_size), fmt, method, p)
        shape = moved.shape[:-1]
        return np.moveaxis(lo.reshape(shape), 0, axis), np.moveaxis(hi.reshape(shape), 0, axis)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
    lo, hi = _group_ranges(rows, fmt, method, p)
    return (lo, hi) if axis is not None else (lo[0], hi[0])


def _blocks(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """``w`` split along ``axis`` into zero-padded blocks: [n_blocks, block_size, other dims...]."""
    moved = np.moveaxis(w, axis, 0)
    n = moved.shape[0]
    padded = np.zeros((-(-n // block_size) * block_size,) + moved.shape[1:], np.float32)
    padded[:n] = moved
    return padded.reshape((-1, block_size) + moved.shape[1:])


def _extremes(groups: np.ndarray, axis: int, fmt: QFormat) -> tuple[np.ndarray, np.ndarray]:
    """(-absmax, absmax) for a symmetric ``fmt``, else (min, max), of ``groups`` along ``axis``."""
    if fmt.symmetric:
        hi = np.abs(groups).max(axis=axis)
        return -hi, hi
    return groups.min(axis=axis), groups.max(axis=axis)


def _group_ranges(rows: np.ndarray, fmt: QFormat, method: str, p: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per row of ``rows``: its +-absmax or [min, max], shrunk for mse/lp."""
    lo, hi = (e.astype(np.float64) for e in _extremes(rows, 1, fmt))
    if method in ("mse", "lp"):
        norm = 2.0 if method == "mse" else p
        best, best_err = np.ones_like(hi), np.full(hi.shape, np.inf)
        for a in ALPHA_GRID:
            scale, zp = scale_zero_point(a * lo, a * hi, fmt)
            err = np.mean(np.abs(fake_quantize(rows, scale, zp, fmt, axis=0) - rows) ** norm, axis=1)
            better = err < best_err
            best[better], best_err[better] = a, err[better]
        lo, hi = best * lo, best * hi
    return lo, hi
