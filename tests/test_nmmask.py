"""N:M masks: magnitude, transposable (exact and the greedy 2-approximation), counts, checks."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from onnx_lapq import ConfigError
from onnx_lapq.nmmask import magnitude_mask, parse_pattern, plain_count, satisfies, transposable_count, transposable_mask


def _blocks(matrix: np.ndarray, m: int) -> np.ndarray:
    rows, k = matrix.shape
    return matrix.reshape(rows // m, m, k // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)


def _kept(matrix: np.ndarray, mask: np.ndarray, m: int) -> np.ndarray:
    """Kept magnitude per M x M block."""
    return _blocks(np.abs(matrix) * mask, m).sum(axis=(1, 2))


def test_magnitude_mask_keeps_the_largest_n_of_every_run():
    w = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    mask = magnitude_mask(w, 2, 4)
    assert satisfies(w * mask, 2, 4) and not satisfies(w, 2, 4)
    runs, kept = np.abs(w).reshape(6, 4, 4), mask.reshape(6, 4, 4)
    assert (kept.sum(axis=2) == 2).all()
    assert (np.where(kept, runs, np.inf).min(axis=2) >= np.where(kept, -np.inf, runs).max(axis=2)).all()


def test_exact_transposable_masks_equal_brute_force_on_4x4_blocks():
    """Every 4 x 4 0/1 matrix (2^16) with at most two ones per row and column, the best one per block."""
    w = np.random.default_rng(1).standard_normal((4 * 8, 4 * 10)) ** 3  # heavy tails: some optima leave a row short
    mask = transposable_mask(w, 2, 4)
    assert satisfies(w * mask, 2, 4, transposable=True)
    bits = (np.arange(1 << 16)[:, None] >> np.arange(16)) & 1
    grids = bits.reshape(-1, 4, 4)
    allowed = grids[(grids.sum(axis=1) <= 2).all(axis=1) & (grids.sum(axis=2) <= 2).all(axis=1)].reshape(-1, 16)
    exactly = (allowed.reshape(-1, 4, 4).sum(axis=1) == 2).all(axis=1) & (allowed.reshape(-1, 4, 4).sum(axis=2) == 2).all(axis=1)
    assert len(allowed) == 7343 and exactly.sum() == transposable_count(2, 4) == 90
    scores = _blocks(np.abs(w), 4).reshape(-1, 16) @ allowed.T
    np.testing.assert_allclose(_kept(w, mask, 4), scores.max(axis=1), rtol=1e-5)
    assert (scores.max(axis=1) > scores[:, exactly].max(axis=1) + 1e-9).any()  # exactly two per row and column would lose there


def test_exact_transposable_masks_equal_the_integer_program_on_8x8_blocks():
    """The assignment problem of each 8 x 8 block against scipy.milp on the b-matching's integer program."""
    w = np.random.default_rng(2).standard_normal((16, 24))
    mask = transposable_mask(w, 4, 8)  # 9.4e16 patterns: one assignment problem per block
    assert satisfies(w * mask, 4, 8, transposable=True)
    rows, cols = np.kron(np.eye(8), np.ones(8)), np.kron(np.ones(8), np.eye(8))
    for block, got in zip(_blocks(np.abs(w), 8), _kept(w, mask, 8)):
        best = milp(-block.ravel(), constraints=LinearConstraint(np.vstack([rows, cols]), 0, 4), integrality=np.ones(64), bounds=Bounds(0, 1))
        assert got == pytest.approx(-best.fun, rel=1e-9)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_the_greedy_keeps_at_least_half_of_the_exact_magnitude_on_every_block(n, m):
    w = np.random.default_rng(3).standard_normal((m * 6, m * 6)) ** 3  # heavy tails make greedy choices costly
    exact, approx = transposable_mask(w, n, m), transposable_mask(w, n, m, method="approx")
    assert satisfies(w * approx, n, m, transposable=True)
    ratio = _kept(w, approx, m) / _kept(w, exact, m)
    assert (ratio >= 0.5).all() and (ratio <= 1 + 1e-9).all()


def test_mask_family_sizes():
    assert transposable_count(1, 4) == 24 and transposable_count(2, 4) == 90
    assert transposable_count(3, 6) == 297200 and transposable_count(4, 8) == 116963796250
    assert plain_count(2, 4) == 6**4


def test_bad_patterns_and_shapes_are_refused():
    assert parse_pattern("2:4") == (2, 4)
    for text in ("4:4", "5:4", "0:4", "2-4"):
        with pytest.raises(ConfigError, match="N:M|0 < N < M"):
            parse_pattern(text)
    with pytest.raises(ConfigError, match="not a multiple of M=4"):
        magnitude_mask(np.ones((2, 6)), 2, 4)
    with pytest.raises(ConfigError, match="tile into 4 x 4"):
        transposable_mask(np.ones((6, 8)), 2, 4)
