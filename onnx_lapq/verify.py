"""Self-checks of an exported model: onnx.checker, a load in plain ONNX Runtime with all
optimizations, and agreement of that optimized session with the unoptimized graph.

The last check guards against ONNX Runtime rewrites that change numbers (such as
WeightBiasQuantization moving a float bias onto an int32 grid too fine to hold it): on a
calibration batch, the optimized model may differ from the
same model run without graph optimizations by at most twice the quantization error
itself, or 1% of the outputs' magnitude where that is more (mean |optimized - unoptimized|
<= 2 mean |unoptimized - float| + 1e-2 mean |float|): integer kernels legitimately round
differently, by about the quantization error, and float kernels that ONNX Runtime fuses (a
Conv with the residual Add after it) by up to a fraction of a percent of the outputs, which
can exceed the quantization error of a model whose weights were reconstructed.

:func:`integer_layers` tells how ONNX Runtime will run the exported model: how many of its
quantized layers its CPU optimizations turn into integer kernels (every one at W8A8; none
on sub-8-bit grids, which no CPU kernel keeps: those run dequantized, in float).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from .runtime import quantized_session, session
from .errors import ExportError
from .largemodel import over_protobuf_limit
from .ops import INTEGER_KERNELS, LAYER_OPS

DRIFT_FLOOR = 1e-2  # drift always allowed, as a fraction of the mean output magnitude


def check_exported(model: onnx.ModelProto, reference: onnx.ModelProto, batch: dict[str, np.ndarray]) -> ort.InferenceSession:
    """The optimized ONNX Runtime session of ``model``; ExportError when a check fails.

    ``reference`` is the float model and ``batch`` a calibration batch for the numeric check.
    """
    name = model.graph.output[0].name
    if not over_protobuf_limit(model):
        model = model.SerializeToString()  # read by the checker and both sessions
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported model fails onnx.checker ({str(exc).splitlines()[0]}); please report this with the model") from None
    # no arena: its few runs need none, and one would keep what they allocate (all of a weight-only model's dequantized weights)
    optimized = quantized_session(model, "the exported model", arena="none")
    fast = optimized.run([name], batch)[0].astype(np.float64)
    plain = session(model, optimize=False, arena="none").run([name], batch)[0].astype(np.float64)
    drift = np.abs(fast - plain).mean()
    # the bound is at least DRIFT_FLOOR mean |plain| (mean |exact| >= mean |plain| - error), so
    # a drift within that passes without running the float model
    if drift <= DRIFT_FLOOR * np.abs(plain).mean():
        return optimized
    exact = session(reference, optimize=False, arena="none").run([name], batch)[0].astype(np.float64)  # a scale, not a deliverable: unoptimized is cheapest
    error = np.abs(plain - exact).mean()
    if drift > 2.0 * error + DRIFT_FLOOR * np.abs(exact).mean():
        raise ExportError(
            f"ONNX Runtime's graph optimizations change this quantized model's outputs (mean drift {drift:.3g} against a "
            f"quantization error of {error:.3g}): please report this with the model; other bit-widths may avoid it"
        )
    return optimized


def integer_layers(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(integer kernels in the graph ONNX Runtime's CPU optimizations make of ``model``,
    quantized layers of ``model``: Conv, ConvTranspose, Gemm and MatMul nodes whose second
    input a DequantizeLinear makes); None for a model over protobuf's 2 GB, which ONNX
    Runtime cannot write back.  The optimized graph goes through a temporary file."""
    if over_protobuf_limit(model):
        return None
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    layers = sum(n.op_type in LAYER_OPS and len(n.input) > 1 and made_by.get(n.input[1]) == "DequantizeLinear" for n in model.graph.node)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        session(model, optimized_path=path)
        optimized = onnx.load(path)
    return sum(n.op_type in INTEGER_KERNELS for n in optimized.graph.node), layers
