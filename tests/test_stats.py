"""TensorStats: the streamed histogram equals a one-shot histogram of all the data, in fixed memory."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_lapq.stats import TensorStats


def one_shot(data: np.ndarray, stats: TensorStats) -> np.ndarray:
    """np.histogram of all values on the observer's final bins (last bin closed, as np.histogram does)."""
    values = np.asarray(data, np.float32).astype(np.float64).ravel()
    counts, _ = np.histogram(values, bins=stats.edges)
    return counts


def growing_batches(rng, n_batches=6, size=500):
    """Batches whose range keeps growing (forcing several power-of-two regrowths), plus a shrink."""
    scales = [0.3, 0.9, 5.0, 2.0, 40.0, 0.01][:n_batches]
    return [(rng.standard_normal(size) * s + (0.5 if i % 2 else -0.2)).astype(np.float32) for i, s in enumerate(scales)]


@pytest.mark.parametrize("half_bins", [8, 64, 2048])
def test_streaming_equals_one_shot(rng, half_bins):
    batches = growing_batches(rng)
    stats = TensorStats(half_bins)
    sizes = set()
    for b in batches:
        stats.update(b.reshape(5, -1))
        sizes.add(stats.counts.size)
    data = np.concatenate(batches)
    assert sizes == {2 * half_bins}  # memory does not grow
    assert stats.count == data.size
    assert stats.min == float(data.min()) and stats.max == float(data.max())
    assert stats.radius >= max(-data.min(), data.max())
    assert np.log2(stats.radius) == int(np.log2(stats.radius))  # a power of two
    assert stats.radius / 2 < max(-data.min(), data.max())  # and the smallest that holds the data
    np.testing.assert_array_equal(stats.counts, one_shot(data, stats))
    assert stats.counts.sum() == data.size


def test_growth_beyond_bin_count_is_exact():
    """A jump of the range by more than half_bins puts old values in the two bins beside 0, exactly."""
    stats = TensorStats(4)
    small = np.array([-0.3, -0.1, 0.05, 0.2, 0.7], np.float32)
    big = np.array([-900.0, 3.0, 1000.0], np.float32)
    stats.update(small)
    stats.update(big)
    data = np.concatenate([small, big])
    np.testing.assert_array_equal(stats.counts, one_shot(data, stats))
    assert stats.radius == 1024.0


def test_values_on_power_of_two_edges():
    stats = TensorStats(16)
    data = np.array([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 4.0], np.float32)
    stats.update(data)
    assert stats.radius == 4.0
    np.testing.assert_array_equal(stats.counts, one_shot(data, stats))


@pytest.mark.parametrize("scale_a, scale_b", [(1.0, 1.0), (0.2, 30.0), (50.0, 0.5)])
def test_merge_equals_one_shot(rng, scale_a, scale_b):
    a_data = (rng.standard_normal(700) * scale_a).astype(np.float32)
    b_data = (np.abs(rng.standard_normal(300)) * scale_b).astype(np.float32)
    a, b = TensorStats(128), TensorStats(128)
    a.update(a_data)
    b.update(b_data)
    before = a.counts.copy(), b.counts.copy(), a.radius, b.radius
    merged = a.merge(b)
    data = np.concatenate([a_data, b_data])
    assert merged.count == data.size
    assert merged.min == float(data.min()) and merged.max == float(data.max())
    assert merged.counts.size == 256
    np.testing.assert_array_equal(merged.counts, one_shot(data, merged))
    # merging does not change its operands
    np.testing.assert_array_equal(a.counts, before[0])
    np.testing.assert_array_equal(b.counts, before[1])
    assert (a.radius, b.radius) == before[2:]
    # and is symmetric
    np.testing.assert_array_equal(b.merge(a).counts, merged.counts)


def test_merge_with_empty_observer(rng):
    data = rng.standard_normal(100).astype(np.float32)
    a = TensorStats(64)
    a.update(data)
    merged = TensorStats(64).merge(a)
    np.testing.assert_array_equal(merged.counts, a.counts)
    assert (merged.min, merged.max, merged.count, merged.radius) == (a.min, a.max, a.count, a.radius)


def test_merge_rejects_different_bin_counts():
    with pytest.raises(ValueError):
        TensorStats(64).merge(TensorStats(128))


def test_empty_batch_changes_nothing():
    stats = TensorStats(8)
    stats.update(np.zeros((0, 3), np.float32))
    assert stats.count == 0 and not stats.counts.any()
    stats.update(np.array([1.5], np.float32))
    stats.update(np.zeros(0, np.float32))
    assert stats.count == 1 and stats.counts.sum() == 1


def test_edges_and_centers():
    stats = TensorStats(4)
    stats.update(np.array([-3.0, 3.0], np.float32))
    np.testing.assert_array_equal(stats.edges, np.arange(-4.0, 4.01, 1.0))
    np.testing.assert_array_equal(stats.centers, np.arange(-3.5, 3.6, 1.0))
