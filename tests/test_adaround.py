"""Learned rounding (adaround.py): on the grid bit for bit, better than round to nearest on
correlated inputs, deterministic, groups independent, safe on dead input columns."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_lapq.adaround import adaround
from onnx_lapq.rowgrid import better_than_nearest, row_error
from onnx_lapq.qmath import QFormat
from onnx_lapq.rowgrid import RowGrid

INT4 = QFormat(4, signed=True, symmetric=True)
INT3 = QFormat(3, signed=True, symmetric=True)
UINT4 = QFormat(4, signed=False, symmetric=False)


def correlated_layer(seed: int, n: int = 2000, d: int = 32, r: int = 16, noise: float = 0.05):
    """(W [1, r, d], float input x [n, d], quantized-model input x̂ [n, d]) with x = A z."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ mixing.T
    x_hat = x + noise * rng.normal(size=x.shape)
    return rng.normal(size=(1, r, d)), x, x_hat


def grams(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Ĥ, C) [1, d, d] of one group."""
    n = len(x)
    return (x_hat.T @ x_hat / n)[None], (x_hat.T @ x / n)[None]


def max_abs_grid(rows: np.ndarray, fmt: QFormat, block: int | None = None) -> RowGrid:
    """Symmetric grid from each row's (or row block's) largest magnitude."""
    if block is None:
        peak = np.abs(rows).max(axis=1)
    else:
        peak = np.abs(rows).reshape(len(rows), -1, block).max(axis=2)
    return RowGrid.of(peak / fmt.qmax, np.zeros(peak.shape, np.int64), fmt, len(rows), block)


def output_error(weight: np.ndarray, x: np.ndarray, x_hat: np.ndarray, w_hat: np.ndarray) -> np.ndarray:
    """E‖W x − Ŵ x̂‖² per row, from the samples."""
    return np.mean((x @ weight[0].T - x_hat @ w_hat[0].T) ** 2, axis=0)


def assert_on_grid(out: np.ndarray, grid: RowGrid) -> None:
    rows = out.reshape(-1, out.shape[-1])
    assert out.dtype == np.float64
    assert np.isfinite(rows).all()
    assert grid.quantize(rows).tobytes() == rows.tobytes()


@pytest.mark.parametrize("block", [None, 8])
def test_the_result_is_on_the_grid_bit_for_bit(block):
    weight, x, x_hat = correlated_layer(0)
    grid = max_abs_grid(weight[0], INT4, block)
    out = adaround(weight, *grams(x, x_hat), grid, iterations=200)
    assert_on_grid(out, grid)
    # every entry is one of its two neighbours on the grid
    floor, _, scale, _ = grid.floor_and_fraction(weight[0])
    steps = np.rint(out[0] / scale.astype(np.float64)) - floor
    assert set(np.unique(steps)) <= {0.0, 1.0}


def test_entries_past_the_grid_stay_clamped():
    weight, x, x_hat = correlated_layer(1, r=8)
    rows = weight[0]
    # asymmetric grid narrower than the weights: many entries fall outside [qmin, qmax]
    scale = (rows.max(axis=1) - rows.min(axis=1)) / UINT4.levels / 2
    zero = np.full(len(rows), 8, np.int64)
    grid = RowGrid.of(scale, zero, UINT4, len(rows))
    out = adaround(weight, *grams(x, x_hat), grid, iterations=200)
    assert_on_grid(out, grid)
    floor, _, _, zp = grid.floor_and_fraction(rows)
    codes = floor + zp
    top = grid.dequantize(np.full(rows.shape, grid.qmax))
    bottom = grid.dequantize(np.full(rows.shape, grid.qmin))
    assert (codes >= grid.qmax).any() and (codes < grid.qmin).any()
    assert np.array_equal(out[0][codes >= grid.qmax], top[codes >= grid.qmax])
    assert np.array_equal(out[0][codes < grid.qmin], bottom[codes < grid.qmin])


@pytest.mark.parametrize("seed", range(5))
def test_learned_rounding_beats_round_to_nearest_on_correlated_inputs(seed):
    weight, x, x_hat = correlated_layer(seed)
    grid = max_abs_grid(weight[0], INT3)
    out = adaround(weight, *grams(x, x_hat), grid)
    nearest = grid.quantize(weight[0])[None]
    assert output_error(weight, x, x_hat, out).sum() < 0.7 * output_error(weight, x, x_hat, nearest).sum()
    out = better_than_nearest(weight, *grams(x, x_hat), out, nearest)
    learned_rows, nearest_rows = output_error(weight, x, x_hat, out), output_error(weight, x, x_hat, nearest)
    assert (learned_rows <= nearest_rows * (1 + 1e-9)).all()
    assert learned_rows.sum() < 0.7 * nearest_rows.sum()


def test_reconstruction_error_is_the_output_error():
    weight, x, x_hat = correlated_layer(2)
    grid = max_abs_grid(weight[0], INT4)
    w_hat = grid.quantize(weight[0])[None]
    hessian, cross = grams(x, x_hat)
    float_gram = (x.T @ x / len(x))[None]
    got = row_error(weight, hessian, cross, w_hat, float_gram)
    assert got.shape == (1, weight.shape[1])
    np.testing.assert_allclose(got[0], output_error(weight, x, x_hat, w_hat), rtol=1e-9)


def test_two_calls_give_the_same_bytes():
    weight, x, x_hat = correlated_layer(3)
    grid = max_abs_grid(weight[0], INT4, 8)
    first = adaround(weight, *grams(x, x_hat), grid, iterations=300)
    second = adaround(weight, *grams(x, x_hat), grid, iterations=300)
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("r, d", [(6, 16), (1, 9)])
def test_batched_groups_give_what_each_group_gives_alone(r, d):
    layers = [correlated_layer(seed, n=400, d=d, r=r) for seed in range(4)]
    weight = np.concatenate([w for w, _, _ in layers])
    hessian, cross = (np.concatenate(m) for m in zip(*(grams(x, x_hat) for _, x, x_hat in layers)))
    # groups of very different input energy
    energy = np.array([1.0, 1e-3, 1e3, 7.0])[:, None, None]
    hessian, cross = hessian * energy, cross * energy
    grid = max_abs_grid(weight.reshape(-1, d), INT4)
    together = adaround(weight, hessian, cross, grid, iterations=300)
    for g in range(len(layers)):
        own = slice(g * r, (g + 1) * r)
        alone_grid = RowGrid.of(grid.scale[own], grid.zero_point[own], INT4, r)
        alone = adaround(weight[g:g + 1], hessian[g:g + 1], cross[g:g + 1], alone_grid, iterations=300)
        assert alone.tobytes() == together[g:g + 1].tobytes()


def test_a_dead_input_column_gives_no_nan_and_rounds_to_nearest():
    weight, x, x_hat = correlated_layer(4, r=8)
    x[:, 5] = 0.0
    x_hat[:, 5] = 0.0
    hessian, cross = grams(x, x_hat)
    grid = max_abs_grid(weight[0], INT4)
    out = adaround(weight, hessian, cross, grid)
    assert_on_grid(out, grid)
    assert np.array_equal(out[0][:, 5], grid.quantize(weight[0])[:, 5])


def test_a_group_with_no_input_at_all_gives_no_nan():
    weight, _, _ = correlated_layer(5, r=4, d=9)
    zero = np.zeros((1, 9, 9))
    grid = max_abs_grid(weight[0], INT4)
    out = adaround(weight, zero, zero, grid, iterations=100)
    assert_on_grid(out, grid)
