"""Layers as matrices: a weight as [groups, rows, d] and the layer's input as columns of d.

A Conv with weight [M, C/g, *k] computes, for every output position and group, W_g · p where
p is the input patch of that position (im2col: channels of the group, then the kernel's
offsets, matching the row-major flattening of W[m]), zero padding included.  A Gemm (transA=0)
or a MatMul with a constant 2-D weight is the same with one group and the input's last axis as
the patch.  :class:`LayerShape` holds what that mapping needs; :meth:`LayerShape.patches` takes
the patches of sampled positions and :meth:`LayerShape.patch_sum` the sum of the patches of all
positions (for E[p], without unfolding the whole input).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

UNFOLDED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerShape:
    """op_type, weight shape and the attributes that map the layer's input to patches."""

    op_type: str
    weight_shape: tuple[int, ...]
    group: int = 1
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends, per spatial axis
    dilations: tuple[int, ...] = ()
    trans_b: bool = False

    @classmethod
    def of(cls, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> "LayerShape | str":
        """The shape of ``node`` with a constant weight of ``weight_shape``, or why it cannot be
        unfolded (a string)."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in UNFOLDED_OPS:
            return f"{node.op_type} is not unfolded"
        if node.op_type == "Conv":
            spatial = len(weight_shape) - 2
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return "Conv with auto_pad"
            return cls(
                "Conv", tuple(weight_shape), int(attrs.get("group", 1)), tuple(attrs.get("strides", [1] * spatial)),
                tuple(attrs.get("pads", [0] * 2 * spatial)), tuple(attrs.get("dilations", [1] * spatial)),
            )
        if len(weight_shape) != 2:
            return f"{node.op_type} with a {len(weight_shape)}-D weight"
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                return "Gemm with transA or alpha"
            return cls("Gemm", tuple(weight_shape), trans_b=bool(attrs.get("transB", 0)))
        return cls("MatMul", tuple(weight_shape))

    @property
    def groups(self) -> int:
        return self.group if self.op_type == "Conv" else 1

    @property
    def columns(self) -> int:
        """d: the length of one patch of one group."""
        if self.op_type == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        return self.weight_shape[1] if self.trans_b else self.weight_shape[0]

    def to_matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as [groups, rows per group, d] (float64)."""
        w = np.asarray(weight, np.float64)
        if self.op_type == "Conv":
            return w.reshape(self.group, w.shape[0] // self.group, -1)
        return (w if self.trans_b else w.T)[None]

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_matrix`, in float32."""
        if self.op_type == "Conv":
            return matrix.reshape(self.weight_shape).astype(np.float32)
        flat = matrix[0]
        return (flat if self.trans_b else flat.T).astype(np.float32).reshape(self.weight_shape)

    def positions(self, x: np.ndarray) -> int:
        """How many patches an input ``x`` has (per group)."""
        if self.op_type != "Conv":
            return int(np.prod(x.shape[:-1]))
        return x.shape[0] * int(np.prod(self._out_shape(x)))

    def patches(self, x: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """The patches at flat positions ``chosen`` (indices below :meth:`positions`), as
        [groups, len(chosen), d] float32, gathered a kernel offset at a time (zero outside the input)."""
        if self.op_type != "Conv":
            return np.asarray(x, np.float32).reshape(-1, x.shape[-1])[chosen][None]
        x = np.asarray(x, np.float32)
        spatial = len(self.strides)
        index = np.unravel_index(chosen, (x.shape[0],) + self._out_shape(x))
        kernel = self.weight_shape[2:]
        out = np.zeros((len(chosen), x.shape[1]) + tuple(kernel), np.float32)
        for offset in np.ndindex(*kernel):
            coords = [index[1 + a] * self.strides[a] + offset[a] * self.dilations[a] - self.pads[a] for a in range(spatial)]
            inside = np.logical_and.reduce([(c >= 0) & (c < x.shape[2 + a]) for a, c in enumerate(coords)])
            picked = x[(index[0][inside], slice(None)) + tuple(c[inside] for c in coords)]  # [inside, C]
            out[(inside, slice(None)) + offset] = picked
        return np.ascontiguousarray(out.reshape(len(chosen), self.group, -1).transpose(1, 0, 2))

    def patch_sum(self, x: np.ndarray) -> np.ndarray:
        """Sum of the patches of every position, [groups, d] float64 (from the input summed over
        the batch first: each kernel offset sums a strided window of it)."""
        if self.op_type != "Conv":
            return np.asarray(x).reshape(-1, x.shape[-1]).sum(axis=0, dtype=np.float64)[None]
        summed = np.asarray(x).sum(axis=0, dtype=np.float64)[None]  # [1, C, *spatial]
        padded = self._padded(summed)[0]
        kernel = self.weight_shape[2:]
        out_shape = self._out_shape(x)
        sums = np.empty((x.shape[1],) + tuple(kernel), np.float64)
        for offset in np.ndindex(*kernel):
            region = tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offset, self.dilations, self.strides, out_shape)
            )
            sums[(slice(None),) + offset] = padded[(slice(None),) + region].sum(axis=tuple(range(1, 1 + len(kernel))))
        return sums.reshape(self.group, -1)

    def _padded(self, x: np.ndarray) -> np.ndarray:
        spatial = len(self.strides)
        widths = [(0, 0), (0, 0)] + [(self.pads[i], self.pads[i + spatial]) for i in range(spatial)]
        return np.pad(np.asarray(x), widths)

    def _out_shape(self, x: np.ndarray) -> tuple[int, ...]:
        spatial = len(self.strides)
        size = [x.shape[2 + i] + self.pads[i] + self.pads[i + spatial] for i in range(spatial)]
        reach = [(k - 1) * d + 1 for k, d in zip(self.weight_shape[2:], self.dilations)]
        return tuple((n - r) // s + 1 for n, r, s in zip(size, reach, self.strides))
