"""Each clipping calibrator of onnx_lapq.clip against a direct numpy reference on the raw samples."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from onnx_lapq import clip
from onnx_lapq.qmath import QFormat, fake_quantize, scale_zero_point
from onnx_lapq.stats import TensorStats

N = 50_007  # not a multiple of 1000: see test_percentile_exact_count_does_not_jump_to_outlier


@functools.lru_cache(maxsize=None)
def samples(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal(N) + 0.3
    elif kind == "laplace":
        x = rng.laplace(size=N)
    elif kind == "relu":  # half the values exactly 0, as after a ReLU
        x = np.maximum(rng.standard_normal(N), 0.0)
    elif kind == "positive":  # non-negative without a spike at 0
        x = rng.gamma(2.0, 1.0, N)
    else:
        raise ValueError(kind)
    x = x.astype(np.float32)
    x.flags.writeable = False
    return x


def observe(x: np.ndarray, half_bins: int = 2048, batches: int = 7) -> TensorStats:
    stats = TensorStats(half_bins)
    for part in np.array_split(x, batches):
        stats.update(part)
    return stats


def true_lp_error(x, lo, hi, bits, p, symmetric=False) -> float:
    """E|Q(x) - x|^p on the raw samples for the range [lo, hi]."""
    fmt = clip.activation_format(min(lo, 0.0), bits, symmetric)
    scale, zp = scale_zero_point(lo, hi, fmt)
    return float(np.mean(np.abs(fake_quantize(x, scale, zp, fmt).astype(np.float64) - x) ** p))


# --------------------------------------------------------------------------- minmax / percentile


@pytest.mark.parametrize("kind", ["gauss", "relu", "positive"])
def test_minmax_is_data_range_with_zero(kind):
    x = samples(kind)
    lo, hi = clip.activation_range(observe(x), "minmax", 8, percentile=99.9, p=2.0)
    assert lo == min(float(x.min()), 0.0)
    assert hi == max(float(x.max()), 0.0)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "relu", "positive"])
@pytest.mark.parametrize("pct", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(kind, pct):
    x = samples(kind)
    stats = observe(x)
    width = stats.radius / stats.half_bins
    lo, hi = clip.activation_range(stats, "percentile", 8, percentile=pct, p=2.0)
    assert abs(hi - np.percentile(x, pct)) <= width
    if x.min() < 0:
        assert abs(lo - np.percentile(x, 100 - pct)) <= width
        assert stats.min <= lo <= 0.0
    assert hi <= stats.max


def test_percentile_lower_bound_is_zero_for_positive_data():
    lo, _ = clip.activation_range(observe(samples("positive")), "percentile", 8, percentile=99.9, p=2.0)
    assert lo == 0.0


def test_percentile_exact_count_does_not_jump_to_outlier():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0, 1, 999), [100.0]]).astype(np.float32)
    assert np.percentile(x, 99.9) < 1.2
    _, hi = clip.activation_range(observe(x), "percentile", 8, percentile=99.9, p=2.0)
    assert hi < 2.0


# --------------------------------------------------------------------------- mse / lp (histogram model)

LP_CASES = [("mse", 2.0), ("lp", 2.4), ("lp", 1.0)]


def _check_alpha_near_best(kind, method, p, bits):
    x = samples(kind)
    stats = observe(x)
    lo, hi = clip.activation_range(stats, method, bits, percentile=99.9, p=p)
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    alpha = hi / hi0
    assert np.isclose(clip.ALPHA_GRID, alpha, rtol=1e-9).any() and (lo0 == 0 or math.isclose(lo / lo0, alpha))
    brute = [true_lp_error(x, a * lo0, a * hi0, bits, p) for a in clip.ALPHA_GRID]
    chosen = true_lp_error(x, lo, hi, bits, p)
    assert chosen <= min(brute) * 1.01, f"alpha {alpha:.2f} costs {chosen / min(brute):.4f}x the best (alpha {clip.ALPHA_GRID[np.argmin(brute)]:.2f})"


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("method, p", LP_CASES)
@pytest.mark.parametrize("kind", ["gauss", "laplace", "positive"])
def test_lp_alpha_is_near_brute_force_best(kind, method, p, bits):
    _check_alpha_near_best(kind, method, p, bits)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("method, p", LP_CASES)
def test_lp_alpha_is_near_brute_force_best_after_relu(method, p, bits):
    _check_alpha_near_best("relu", method, p, bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("p", [1.0, 2.0, 2.4])
def test_lp_errors_estimate_true_error(bits, p):
    """On smooth data the histogram model of E|Q(x)-x|^p is within 2% of the raw-data value."""
    x = samples("gauss")
    stats = observe(x)
    alphas = clip.ALPHA_GRID[::7]
    est = clip.lp_errors(stats, bits, p, alphas)
    lo0, hi0 = float(x.min()), float(x.max())
    true = np.array([true_lp_error(x, a * lo0, a * hi0, bits, p) for a in alphas])
    np.testing.assert_allclose(est, true, rtol=0.02)


def test_mse_shrinks_range_for_heavy_tails():
    x = samples("laplace")
    lo, hi = clip.activation_range(observe(x), "mse", 4, percentile=99.9, p=2.0)
    assert hi < 0.8 * x.max() and lo > 0.8 * x.min()


# --------------------------------------------------------------------------- entropy (KL)


def reference_kl_threshold(counts, half_bins, radius, nonnegative, bits) -> float:
    """TensorRT-style KL calibration in plain loops on the |x| histogram.

    hist[j] counts |x| in bin j (the first bin takes the count of the second, dropping the
    spike of exact zeros).  For every threshold i from the number of levels to the last
    non-empty bin with at least `levels` non-empty bins below it: P = hist[:i] with the
    clipped tail added to its last bin; Q merges
    hist[:i] into `levels` chunks (bin j in chunk j*levels//i) and spreads each chunk's sum
    evenly over that chunk's non-empty bins; the threshold minimizes KL(P || Q).
    """
    n = half_bins
    hist = [float(counts[n + j] + counts[n - 1 - j]) for j in range(n)]
    hist[0] = hist[1]
    levels = 2**bits if nonnegative else 2 ** (bits - 1)
    last = max(j for j in range(n) if hist[j] > 0) + 1
    if last <= levels:
        return last * radius / n
    best_i, best_kl = last, math.inf
    for i in range(levels, last + 1):
        if sum(h > 0 for h in hist[:i]) < levels:
            continue
        p = hist[:i]
        p[i - 1] += sum(hist[i:])
        chunk_sum = [0.0] * levels
        chunk_nonzero = [0] * levels
        for j in range(i):
            chunk = j * levels // i
            chunk_sum[chunk] += hist[j]
            chunk_nonzero[chunk] += hist[j] > 0
        q = [chunk_sum[j * levels // i] / chunk_nonzero[j * levels // i] if hist[j] > 0 else 0.0 for j in range(i)]
        p_total, q_total = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl += math.inf if qj == 0 else (pj / p_total) * math.log((pj / p_total) / (qj / q_total))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * radius / n


@pytest.mark.parametrize("kind, bits", [("relu", 4), ("positive", 4), ("laplace", 4), ("gauss", 3), ("laplace", 5)])
def test_entropy_threshold_matches_reference(kind, bits):
    x = samples(kind, seed=3)
    stats = observe(x, half_bins=128)
    expected = reference_kl_threshold(stats.counts, stats.half_bins, stats.radius, stats.min >= 0, bits)
    assert clip.entropy_threshold(stats, bits) == pytest.approx(expected, rel=1e-12)
    lo, hi = clip.activation_range(stats, "entropy", bits, percentile=99.9, p=2.0)
    assert hi == min(stats.max, expected)
    assert lo == (0.0 if stats.min >= 0 else max(stats.min, -expected))


def test_entropy_clips_outliers_and_keeps_short_histograms_whole():
    x = samples("laplace", seed=5)
    stats = observe(x, half_bins=128)
    t = clip.entropy_threshold(stats, 4)
    assert 0 < t < 0.7 * max(-x.min(), x.max())
    # fewer non-empty bins than levels: nothing to clip, the threshold covers all data
    assert clip.entropy_threshold(stats, 8) >= max(-x.min(), x.max())


def test_entropy_keeps_integer_valued_inputs_unclipped_at_4_bits():
    """Mean-subtracted pixels (integers in [-123, 151]) fill one bin in eight: the
    threshold must not collapse to the first bins, where a lone bin makes KL zero."""
    x = np.random.default_rng(0).integers(-123, 152, size=(64, 3, 16, 16)).astype(np.float32)
    stats = observe(x, half_bins=2048)
    assert clip.entropy_threshold(stats, 4) > 0.5 * 151


# --------------------------------------------------------------------------- weights


def _rows(w, axis):
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)


@pytest.mark.parametrize("axis", [0, 1, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_range_minmax(axis, symmetric):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((5, 4, 3, 3)) * rng.uniform(0.1, 2, (5, 1, 1, 1))).astype(np.float32)
    fmt = QFormat(8, signed=True, symmetric=symmetric)
    lo, hi = clip.weight_range(w, axis, fmt, "minmax", 2.0)
    rows = _rows(w, axis)
    if symmetric:
        exp_hi = np.abs(rows).max(axis=1)
        exp_lo = -exp_hi
    else:
        exp_lo, exp_hi = rows.min(axis=1), rows.max(axis=1)
    if axis is None:
        assert np.ndim(lo) == 0 and np.ndim(hi) == 0
        exp_lo, exp_hi = exp_lo[0], exp_hi[0]
    else:
        assert lo.shape == hi.shape == (w.shape[axis],)
    np.testing.assert_array_equal(lo, exp_lo)
    np.testing.assert_array_equal(hi, exp_hi)


@pytest.mark.parametrize("method, p", [("mse", 2.0), ("lp", 2.4), ("lp", 3.5)])
@pytest.mark.parametrize("bits, symmetric", [(4, True), (3, True), (8, True), (4, False)])
@pytest.mark.parametrize("axis", [0, 1, None])
def test_weight_range_mse_lp_is_brute_force_argmin(method, p, bits, symmetric, axis):
    rng = np.random.default_rng(bits * 10 + int(symmetric))
    w = rng.laplace(size=(6, 5, 3, 3)).astype(np.float32)
    w[2] *= 0.01  # channels of very different magnitude
    fmt = QFormat(bits, signed=True, symmetric=symmetric)
    lo, hi = clip.weight_range(w, axis, fmt, method, p)
    lo, hi = np.atleast_1d(lo), np.atleast_1d(hi)
    rows = _rows(w, axis)
    for c, row in enumerate(rows):
        base_lo, base_hi = (-np.abs(row).max(), np.abs(row).max()) if symmetric else (row.min(), row.max())
        errors = []
        for a in clip.ALPHA_GRID:
            scale, zp = scale_zero_point(a * base_lo, a * base_hi, fmt)
            errors.append(np.mean(np.abs(fake_quantize(row, scale, zp, fmt).astype(np.float64) - row) ** p))
        best = clip.ALPHA_GRID[int(np.argmin(errors))]
        assert hi[c] == pytest.approx(best * base_hi, rel=1e-12, abs=0)
        assert lo[c] == pytest.approx(best * base_lo, rel=1e-12, abs=0)
