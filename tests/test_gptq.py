"""gptq(): on the grid, below round-to-nearest's output error, the same batched as alone."""
import numpy as np
import pytest

from onnx_lapq.gptq import gptq
from onnx_lapq.qmath import QFormat, scale_zero_point
from onnx_lapq.rowgrid import RowGrid


def _problem(seed, groups=1, rows=16, d=32, n=2000, noise=0.05, bits=3):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((groups, d, d)) / np.sqrt(d)
    x = np.matmul(rng.standard_normal((groups, n, d)), mix)  # correlated inputs
    x_hat = x + noise * rng.standard_normal(x.shape)  # the partly quantized model's inputs
    w = rng.standard_normal((groups, rows, d))
    fmt = QFormat(bits, signed=True, symmetric=True)
    hi = np.abs(w).max(axis=2).ravel()
    scale, zp = scale_zero_point(-hi, hi, fmt)
    grid = RowGrid.of(scale, zp, fmt, groups * rows)
    hessian = np.matmul(x_hat.transpose(0, 2, 1), x_hat) / n
    cross = np.matmul(x_hat.transpose(0, 2, 1), x) / n
    return w, x, x_hat, hessian, cross, grid


def _error(w, w_hat, x, x_hat):
    return float(np.mean((np.matmul(x, w.transpose(0, 2, 1)) - np.matmul(x_hat, w_hat.transpose(0, 2, 1))) ** 2))


@pytest.mark.parametrize("seed", range(5))
def test_gptq_beats_round_to_nearest_and_stays_on_the_grid(seed):
    w, x, x_hat, hessian, cross, grid = _problem(seed)
    w_hat = gptq(w, hessian, cross, grid)
    flat = w_hat.reshape(-1, w.shape[2])
    np.testing.assert_array_equal(grid.quantize(flat), flat)
    rtn = grid.quantize(w.reshape(-1, w.shape[2])).reshape(w.shape)
    assert _error(w, w_hat, x, x_hat) < 0.6 * _error(w, rtn, x, x_hat)


def test_input_aware_target_beats_the_float_hessian_alone():
    w, x, x_hat, hessian, cross, grid = _problem(0, noise=0.3, bits=4)
    aware = gptq(w, hessian, cross, grid)
    plain = gptq(w, hessian, hessian, grid)  # as if the float input were the quantized one
    assert _error(w, aware, x, x_hat) < _error(w, plain, x, x_hat)


def test_groups_solve_as_if_alone_and_blockwise_grids_work():
    w, x, x_hat, hessian, cross, grid = _problem(1, groups=3, rows=2, d=9)
    together = gptq(w, hessian, cross, grid)
    for g in range(3):
        alone_grid = RowGrid(grid.scale[2 * g:2 * g + 2], grid.zero_point[2 * g:2 * g + 2], grid.fmt)
        alone = gptq(w[g:g + 1], hessian[g:g + 1], cross[g:g + 1], alone_grid)
        np.testing.assert_array_equal(together[g:g + 1], alone)
    w, x, x_hat, hessian, cross, _ = _problem(2, d=32)
    fmt = QFormat(4, signed=True, symmetric=True)
    hi = np.abs(w[0].reshape(16, 4, 8)).max(axis=2)  # blocks of 8 columns
    scale, zp = scale_zero_point(-hi, hi, fmt)
    blocks = RowGrid(scale, zp, fmt, block=8)
    w_hat = gptq(w, hessian, cross, blocks, block=5)
    np.testing.assert_array_equal(blocks.quantize(w_hat[0]), w_hat[0])
    assert _error(w, w_hat, x, x_hat) < _error(w, blocks.quantize(w[0])[None], x, x_hat)


def test_dead_inputs_give_zero_weights_not_nan():
    w, x, x_hat, hessian, cross, grid = _problem(3)
    hessian[:, 4, :] = hessian[:, :, 4] = 0.0
    cross[:, 4, :] = cross[:, :, 4] = 0.0
    w_hat = gptq(w, hessian, cross, grid)
    assert np.all(np.isfinite(w_hat)) and np.all(w_hat[:, :, 4] == 0.0)
    assert np.array_equal(w_hat, gptq(w, hessian, cross, grid))  # deterministic
