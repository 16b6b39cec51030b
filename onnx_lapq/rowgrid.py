"""A layer's weight as a matrix of rows (one per output channel) and the integer grid of each row.

Reconstruction works on W as a [rows, d] matrix whose row r maps one unfolded input column
(``unfold.py``) to output channel r.  :class:`RowGrid` is the grid the weight's QParams put on
that matrix: a scale and zero point per row, or per row and block of ``block`` consecutive
columns (blockwise weight-only grids).  ``quantize_columns`` is the export's
QuantizeLinear/DequantizeLinear maths (qmath) on those entries, so a matrix a solver returns is
stored bit for bit.

The objective of a layer's rows, with Ĥ = E[x̂ x̂ᵀ] and C = E[x̂ xᵀ] ([G, d, d]; x̂ its input in the
partly quantized model, x in the float one) is E‖w x − ŵ x̂‖² = ŵ Ĥ ŵᵀ − 2 ŵ C wᵀ + w F wᵀ
(F = E[x xᵀ]) row by row (:func:`row_error`); rows are independent, so
:func:`better_than_nearest` can keep, row by row, a solver's answer or round to nearest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .qmath import QFormat, dequantize, fake_quantize


@dataclass(frozen=True)
class RowGrid:
    """scale, zero_point: [rows] or [rows, blocks] (float32 / int64); fmt the integer grid."""

    scale: np.ndarray
    zero_point: np.ndarray
    fmt: QFormat
    block: int | None = None

    @property
    def qmin(self) -> int:
        return self.fmt.qmin

    @property
    def qmax(self) -> int:
        return self.fmt.qmax

    @classmethod
    def of(cls, scale, zero_point, fmt: QFormat, rows: int, block: int | None = None) -> "RowGrid":
        """The grid of a weight whose per-row (or per-tensor, broadcast) parameters are given."""
        scale = np.asarray(scale, np.float32)
        zero_point = np.asarray(zero_point, np.int64)
        if scale.ndim == 0:
            scale, zero_point = np.full(rows, scale, np.float32), np.full(rows, zero_point, np.int64)
        return cls(scale, zero_point, fmt, block)

    def _column_params(self, columns: slice | np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        if self.block is None:
            return self.scale[:, None], self.zero_point[:, None]
        index = np.arange(width)[columns] // self.block
        return self.scale[:, index], self.zero_point[:, index]

    def quantize_columns(self, values: np.ndarray, columns: slice | np.ndarray, width: int) -> np.ndarray:
        """Fake-quantized ``values`` ([rows, k], float64) that sit at ``columns`` of a matrix ``width`` wide."""
        scale, zero = self._column_params(columns, width)
        return fake_quantize(values, scale, zero, self.fmt).astype(np.float64)

    def quantize(self, matrix: np.ndarray) -> np.ndarray:
        """Round to nearest on the grid, every entry of a [rows, d] matrix."""
        return self.quantize_columns(matrix, slice(None), matrix.shape[1])

    def floor_and_fraction(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(floor of W/s, W/s - floor, scale, zero point), all [rows, d]: what a learned rounding
        (AdaRound) chooses between; codes are clamp(floor + up + z, qmin, qmax)."""
        scale, zero = self._column_params(slice(None), matrix.shape[1])
        scale = np.broadcast_to(scale, matrix.shape)
        zero = np.broadcast_to(zero, matrix.shape)
        scaled = matrix / scale.astype(np.float64)
        floor = np.floor(scaled)
        return floor, scaled - floor, scale, zero

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Real values (float64) of integer codes ``codes`` ([rows, d], zero point included)."""
        scale, zero = self._column_params(slice(None), codes.shape[1])
        return dequantize(np.clip(codes, self.qmin, self.qmax), scale, zero).astype(np.float64)


def row_error(weight: np.ndarray, hessian: np.ndarray, cross: np.ndarray, w_hat: np.ndarray,
              float_gram: np.ndarray | None = None) -> np.ndarray:
    """[G, r]: each row's ŵ Ĥ ŵᵀ − 2 ŵ C wᵀ, plus w F wᵀ when the float Gram F is given, so
    that it equals E‖w x − ŵ x̂‖² (see the module docstring)."""
    out = np.einsum("grd,grd->gr", w_hat, w_hat @ hessian - 2.0 * weight @ np.swapaxes(cross, 1, 2))
    if float_gram is not None:
        out = out + np.einsum("grd,grd->gr", weight, weight @ float_gram)
    return out


def better_than_nearest(weight: np.ndarray, hessian: np.ndarray, cross: np.ndarray, w_hat: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """``w_hat`` [G, r, d] with every row whose objective is above that of ``nearest`` (the
    weight rounded to nearest, [G, r, d]) replaced by it: a solver's answer, never worse than
    plain rounding row by row."""
    keep = row_error(weight, hessian, cross, w_hat) <= row_error(weight, hessian, cross, nearest)
    return np.where(keep[:, :, None], w_hat, nearest)
