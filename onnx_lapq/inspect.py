"""What a model's layers hold: python -m onnx_lapq.inspect MODEL.onnx [--json OUT.json]

For every Conv, Gemm and MatMul whose weight is constant (an initializer, or a
DequantizeLinear of one), quantized or not:
  * the weight's stored type and the bits its codes span (a 3-bit grid in 4-bit integers
    spans 3), and its granularity (per tensor, per channel, blocks of B);
  * the bits of the layer's input grid, where a QuantizeLinear/DequantizeLinear pair makes
    it (a Clip before the QuantizeLinear narrows it), else float;
  * the weight's bytes as stored: codes (4-bit types packed two to a byte), scales and zero
    points; and as a sparse format stores an N:M layer (NVIDIA's 2:4 layout): N codes of
    every M plus a ceil(log2 M)-bit index for each;
  * the share of zero weights and the sparsest N:M pattern its weights follow along the
    reduction dimension in sparse kernels' layout (nmmask.reduction_matrix; M of 4, 8 or
    16, N at most M/2: what sparse kernels skip), and whether also transposably (N per
    column of every M x M tile).
Quantized weights are judged on their real values: a code equal to its zero point is a zero.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import LapqError
from .graphindex import GraphIndex
from .largemodel import data_bytes, element_bits
from .modelio import load_model, save_text_atomic
from .nmmask import reduction_matrix, satisfies

INSPECTED_OPS = ("Conv", "Gemm", "MatMul")
PATTERN_SIZES = (4, 8, 16)


@dataclass(frozen=True)
class LayerFacts:
    """One layer's row of the inspection (see the module docstring)."""

    node: str
    op_type: str
    weight_type: str
    weight_bits: int
    granularity: str
    act_bits: int | None  # None: the input is not quantized
    weight_bytes: int
    sparse_bytes: int  # weight_bytes with the codes stored as the pattern's sparse format (weight_bytes where dense)
    zeros: float
    pattern: str | None  # "N:M", None when no M of PATTERN_SIZES holds at most M/2 non-zeros per run
    transposable: bool


def inspect_model(model: onnx.ModelProto) -> list[LayerFacts]:
    """The facts of every layer of ``model`` with a constant weight, in graph order."""
    index = GraphIndex(model.graph)
    facts = []
    for node in model.graph.node:
        if node.op_type not in INSPECTED_OPS or len(node.input) < 2:
            continue
        weight = _weight(index, node.input[1])
        if weight is None:
            continue
        real, stored, bits, granularity, codes_bytes, param_bytes = weight
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if (real.ndim < 3) if node.op_type == "Conv" else (real.ndim != 2):
            continue
        matrix = reduction_matrix(node.op_type, real, trans_b)
        pattern, transposable = _pattern(matrix)
        sparse = codes_bytes if pattern is None else _sparse_bytes(real.size, element_bits(stored), pattern)
        facts.append(LayerFacts(
            node.name, node.op_type, helper.tensor_dtype_to_string(stored).replace("TensorProto.", "").lower(), bits, granularity,
            _act_bits(index, node.input[0]), codes_bytes + param_bytes, sparse + param_bytes, round(float((real == 0).mean()), 6),
            pattern, transposable,
        ))
    return facts


def _sparse_bytes(count: int, bits: int, pattern: str) -> int:
    """Bytes of ``count`` weights of ``bits`` stored N:M: N of every M values, each with a
    ceil(log2 M)-bit position in its run."""
    n, m = (int(x) for x in pattern.split(":"))
    kept = count // m * n
    return -(-kept * (bits + math.ceil(math.log2(m))) // 8)


def _weight(index: GraphIndex, name: str):
    """(real values, stored type, bits its codes span, granularity, bytes of its codes, bytes of
    its scales and zero points) of a constant weight, or None where it is not one."""
    if name in index.initializers:
        tensor = index.initializers[name]
        real = numpy_helper.to_array(tensor).astype(np.float64)
        return real, tensor.data_type, element_bits(tensor.data_type), "float", data_bytes(tensor), 0
    node = index.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in index.initializers:
        return None
    codes_tensor = index.initializers[node.input[0]]
    codes = numpy_helper.to_array(codes_tensor).astype(np.int64)
    scale = numpy_helper.to_array(index.initializers[node.input[1]]).astype(np.float64) if node.input[1] in index.initializers else None
    zero = (numpy_helper.to_array(index.initializers[node.input[2]]).astype(np.int64)
            if len(node.input) > 2 and node.input[2] in index.initializers else np.zeros_like(scale, np.int64))
    if scale is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    if block:
        expand = lambda p: np.repeat(p, block, axis=axis).take(np.arange(codes.shape[axis]), axis=axis)  # noqa: E731
        granularity = f"blocks of {block}"
    elif scale.ndim == 1 and scale.size > 1:
        view = [1] * codes.ndim
        view[axis] = -1
        expand = lambda p: p.reshape(view)  # noqa: E731
        granularity = "per channel"
    else:
        expand = lambda p: p  # noqa: E731
        granularity = "per tensor"
    real = (codes - expand(zero)) * expand(scale)
    span = int(codes.max() - codes.min()) + 1 if codes.size else 1
    params = sum(data_bytes(index.initializers[i]) for i in node.input[1:] if i in index.initializers)
    return real, codes_tensor.data_type, max(1, math.ceil(math.log2(span))), granularity, data_bytes(codes_tensor), params


def _act_bits(index: GraphIndex, name: str) -> int | None:
    """Bits of the grid that ``name`` takes through QuantizeLinear -> DequantizeLinear, or None."""
    dq = index.producer.get(name)
    q = index.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return None
    zero = index.initializers.get(q.input[2]) if len(q.input) > 2 else None
    bits = element_bits(zero.data_type) if zero is not None else 8
    clip = index.producer.get(q.input[0])
    scale = index.constant(q.input[1])
    if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3 and scale is not None:
        lo, hi = index.constant(clip.input[1]), index.constant(clip.input[2])
        if lo is not None and hi is not None:
            levels = int(round((float(hi) - float(lo)) / float(scale))) + 1
            bits = min(bits, max(1, math.ceil(math.log2(levels))))
    return bits


def _pattern(matrix: np.ndarray) -> tuple[str | None, bool]:
    """The sparsest "N:M" the matrix follows (lowest N/M over PATTERN_SIZES, the smaller M on
    ties) and whether transposably, or (None, False)."""
    best = None
    for m in PATTERN_SIZES:
        if matrix.shape[1] % m:
            continue
        runs = (matrix != 0).reshape(len(matrix), -1, m).sum(axis=2)
        n = int(runs.max()) if runs.size else 0
        if 2 * n <= m and (best is None or n / m < best[0] / best[1]):
            best = (max(n, 1), m)
    if best is None:
        return None, False
    n, m = best
    return f"{n}:{m}", satisfies(matrix, n, m, transposable=True)


def format_table(facts: list[LayerFacts]) -> str:
    """The facts as a text table, one layer a line, and the total weight bytes."""
    lines = [f"{'layer':40s} {'op':7s} {'weights':16s} {'granularity':14s} {'input':6s} {'bytes':>10s} {'zeros':>6s} pattern"]
    for f in facts:
        weights = f"{f.weight_bits}-bit {f.weight_type}" if f.weight_type != "float" else "float32"
        pattern = "dense" if f.pattern is None else f.pattern + (" transposable" if f.transposable else "")
        act = "float" if f.act_bits is None else f"{f.act_bits}-bit"
        lines.append(f"{f.node[:40]:40s} {f.op_type:7s} {weights:16s} {f.granularity:14s} {act:6s} {f.weight_bytes:10d} {f.zeros:6.1%} {pattern}")
    sparse = sum(f.sparse_bytes for f in facts)
    stored = sum(f.weight_bytes for f in facts)
    lines.append(f"{len(facts)} layers, {stored} weight bytes" + (f", {sparse} stored sparse" if sparse < stored else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnx_lapq.inspect", description="Per-layer bit-widths, weight bytes and N:M sparsity of an ONNX model.")
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("--json", metavar="OUT.json", help="also write the facts as JSON")
    args = parser.parse_args(argv)
    try:
        facts = inspect_model(load_model(args.model))
        if args.json:
            save_text_atomic(json.dumps([asdict(f) for f in facts], indent=1), args.json)
    except (LapqError, OSError) as exc:
        print(f"onnx_lapq.inspect: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
