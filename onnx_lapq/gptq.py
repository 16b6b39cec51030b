"""Hessian-based rounding with error feedback (GPTQ, Frantar et al. 2022), in numpy, from Gram matrices.

For one layer as [G, r, d] matrices (unfold.py), with Ĥ = E[x̂ x̂ᵀ] the Gram of its input in
the partly quantized model and C = E[x̂ xᵀ] the cross Gram with the float model's input, the
quantized weight Ŵ minimizes E‖W x − Ŵ x̂‖² = tr(Ŵ Ĥ Ŵᵀ) − 2 tr(Ŵ C Wᵀ) + const.  That is
‖(Ŵ − W*) x̂‖² + const with the input-aware target W* = W Cᵀ Ĥ⁻¹, computed as
W + W (Cᵀ − Ĥ) Ĥ_λ⁻¹ so that damping does not shrink W where the inputs agree (C = Ĥ).

GPTQ then quantizes W* one column at a time: q_i = Q(w_i), and the columns not yet quantized
absorb the error, W[:, j>i] −= (w_i − q_i) / U_ii · U[i, j>i], with U the upper Cholesky factor
of Ĥ_λ⁻¹; lazily, in blocks of ``block`` columns.  Ĥ_λ = Ĥ + λ·mean(diag Ĥ)·I (``damping``);
columns whose input is always 0 are zeroed.  With ``act_order`` the columns go in order of
decreasing diag Ĥ (per group).  All groups are solved at once.
"""
from __future__ import annotations

import numpy as np

from .rowgrid import RowGrid


def gptq(
    weight: np.ndarray, hessian: np.ndarray, cross: np.ndarray, grid: RowGrid, *,
    damping: float = 0.01, act_order: bool = True, block: int = 128, support: np.ndarray | None = None,
) -> np.ndarray:
    """Ŵ [G, r, d] on ``grid`` (whose rows are the G·r rows in order) for ``weight`` [G, r, d],
    ``hessian`` Ĥ and ``cross`` C ([G, d, d], see the module docstring).  Entries outside
    ``support`` ([G, r, d] bool: a pruned layer's kept weights) are set to 0 as their column
    comes, and the columns after absorb that error as they absorb rounding's (SparseGPT's
    sweep on a fixed mask)."""
    groups, rows, d = weight.shape
    h = np.array(hessian, np.float64)
    w = np.array(weight, np.float64)
    diagonal = np.diagonal(h, axis1=1, axis2=2)
    dead = diagonal <= 0
    index = np.arange(d)
    h[:, index, index] += np.where(dead, 1.0, 0.0)
    w = np.where(dead[:, None, :], 0.0, w)
    mean_diag = np.maximum(np.diagonal(h, axis1=1, axis2=2).mean(axis=1), np.finfo(np.float64).tiny)
    h[:, index, index] += damping * mean_diag[:, None]
    target = w + np.matmul(w, np.swapaxes(cross, 1, 2) - hessian) @ np.linalg.inv(h)
    target = np.where(dead[:, None, :], 0.0, target)

    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable") if act_order else np.tile(index, (groups, 1))
    if grid.block is not None and groups > 1:
        raise ValueError("blockwise grids are for single-group layers")
    target = np.take_along_axis(target, order[:, None, :], axis=2)
    kept = None if support is None else np.take_along_axis(np.asarray(support, bool), order[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)  # U with Ĥ_λ⁻¹ = Uᵀ U

    quantized = np.empty_like(target)
    for start in range(0, d, block):
        stop = min(start + block, d)
        errors = np.empty((groups, rows, stop - start))
        for i in range(start, stop):
            column = target[:, :, i]
            q = grid.quantize_columns(column.reshape(groups * rows, 1), order[0, i:i + 1], d).reshape(groups, rows)
            if kept is not None:
                q = np.where(kept[:, :, i], q, 0.0)
            quantized[:, :, i] = q
            error = (column - q) / upper[:, i, i][:, None]
            errors[:, :, i - start] = error
            target[:, :, i + 1:stop] -= error[:, :, None] * upper[:, None, i, i + 1:stop]
        target[:, :, stop:] -= np.matmul(errors, upper[:, start:stop, stop:])
    inverse = np.argsort(order, axis=1)
    return np.take_along_axis(quantized, inverse[:, None, :], axis=2)
