"""Integer quantization maths in pure numpy (no onnx), bit-exact with ONNX Q/DQ.

    q     = clamp(rint(x / s) + z, qmin, qmax)     (round half to even, saturate)
    x_hat = (q - z) * s                            (computed in float32)

s and z are scalars (per tensor), 1-D along an axis (per channel), or blockwise: same
rank as x, with the axis divided into blocks of ``block_size`` (opset 21).

A :class:`QFormat` is the integer grid of one site: its bit-width, signedness and
the clamp range.  Symmetric grids drop the most negative code so that the range is
-(2**(b-1)-1)..2**(b-1)-1 and zero is exact; asymmetric grids use every code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QFormat:
    """An integer grid: ``bits`` wide, ``signed`` or not, clamped to [qmin, qmax]."""

    bits: int
    signed: bool
    symmetric: bool

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


def scale_zero_point(lo, hi, fmt: QFormat) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) mapping the real range [lo, hi] onto ``fmt``.

    The range is first widened to contain 0 so that zero is exactly representable.
    Symmetric formats give z = 0 (unsigned formats require lo >= 0); a degenerate
    range gives s = 1.
    """
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if fmt.symmetric:
        if fmt.signed:
            scale = np.maximum(-lo, hi) / fmt.qmax
        else:
            scale = hi / fmt.qmax
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        scale = (hi - lo) / fmt.levels
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(fmt.qmin - lo / safe), fmt.qmin, fmt.qmax).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zero_point


def broadcast(param, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Per-tensor, per-axis (1-D) or blockwise (same rank, blocks along ``axis``) parameters,
    shaped to broadcast against a tensor of ``shape``."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    if block_size is not None:
        return np.repeat(param, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return param.reshape(view)


def quantize(x, scale, zero_point, fmt: QFormat, axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """Integer codes of ``x``, as ONNX QuantizeLinear computes them in float32: int32 for
    grids of 16 bits or less, int64 for wider ones."""
    x = np.asarray(x, np.float32)
    split = whole_blocks(x.shape, axis, block_size)
    if split is not None:  # the blocks as an axis of their own: parameters broadcast without copies
        return quantize(x.reshape(split), np.expand_dims(scale, axis + 1), np.expand_dims(zero_point, axis + 1), fmt).reshape(x.shape)
    s = broadcast(np.asarray(scale, np.float32), x.shape, axis, block_size)
    z = broadcast(np.asarray(zero_point, np.float32), x.shape, axis, block_size)  # zero points of 16 bits or less: exact
    q = np.asarray(np.divide(x, s, dtype=np.float32))  # an array even for one value: the steps below write in place
    np.rint(q, out=q)
    q += z  # exact where it matters: a sum past float32's 2**24 integers is clipped to a code far below it
    np.clip(q, fmt.qmin, fmt.qmax, out=q)
    return q.astype(np.int32 if fmt.bits <= 16 else np.int64)


def dequantize(q, scale, zero_point, axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """Real values of integer codes (float32), as ONNX DequantizeLinear computes them."""
    q = np.asarray(q)
    split = whole_blocks(q.shape, axis, block_size)
    if split is not None:
        return dequantize(q.reshape(split), np.expand_dims(scale, axis + 1), np.expand_dims(zero_point, axis + 1)).reshape(q.shape)
    s = broadcast(np.asarray(scale, np.float32), q.shape, axis, block_size)
    z = broadcast(np.asarray(zero_point, np.int64), q.shape, axis, block_size)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def whole_blocks(shape: tuple[int, ...], axis: int | None, block_size: int | None) -> tuple[int, ...] | None:
    """``shape`` with ``axis`` split into [blocks, block_size] where it holds whole blocks, else None."""
    if block_size is None or axis is None or shape[axis] % block_size:
        return None
    return shape[:axis] + (shape[axis] // block_size, block_size) + shape[axis + 1:]


def fake_quantize(x, scale, zero_point, fmt: QFormat, axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """dequantize(quantize(x)): what a Q -> DQ pair does to ``x``."""
    return dequantize(quantize(x, scale, zero_point, fmt, axis, block_size), scale, zero_point, axis, block_size)
