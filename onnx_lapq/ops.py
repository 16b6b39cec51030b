"""Op facts, stated once: which ONNX ops onnx_lapq quantizes and how, and how ONNX Runtime's
CPU provider runs the Q/DQ groups around them.

A *group* is a layer with its DequantizeLinear inputs (and the QuantizeLinear that closes
it, where there is one), or a value-preserving op between a DequantizeLinear and a
QuantizeLinear.  :func:`fuses_to_integer` says whether ONNX Runtime's CPU provider runs a
group as one integer kernel; every module that depends on the answer asks it here.
"""
from __future__ import annotations

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BIAS_OPS = ("Conv", "Gemm")  # layers whose input 2 is a bias (on the s_in * s_w grid once quantized)
# layers whose output the plan quantizes when their group fuses, so that the group closes
# with a QuantizeLinear (an integer-in, integer-out kernel); a fused MatMul keeps a float
# output (MatMulIntegerToFloat), since requantizing between a transformer's MatMuls costs
# accuracy
REQUANTIZED_OUTPUT_OPS = ("Conv", "ConvTranspose", "Gemm")
INTEGER_KERNEL_BITS = 8  # the only grid width of ONNX Runtime's CPU integer kernels

# ops that move values without changing them: their output is on their input's grid
PASS_THROUGH_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout")
# ONNX Runtime's QDQ propagation moves Q/DQ across these ops and then runs them on the
# integers, for which it has no 4-bit kernels, and its Clip+QuantizeLinear fusion rejects
# a 4-bit zero point: a sub-8-bit site next to one stores its codes in an 8-bit container
# (same grid, same numbers) so the model loads at ENABLE_ALL.
WIDE_CONTAINER_OPS = PASS_THROUGH_OPS + ("Slice", "Gather", "Resize", "Expand", "Split", "Tile", "DepthToSpace", "SpaceToDepth", "Clip")
# activations that ONNX Runtime folds into the QuantizeLinear after a layer (Clip only with a min >= 0)
FUSABLE_ACTIVATIONS = ("Relu", "Clip")
# ops that only a quantized model holds: ONNX's Q/DQ pair and ONNX Runtime's integer kernels
QUANTIZED_OPS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "GatherBlockQuantized", "QAttention",
)
# what ONNX Runtime's CPU optimizations make of a fused group (or of a weight-only MatMul)
INTEGER_KERNELS = (
    "QLinearConv", "QLinearConvTranspose", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
    "MatMulNBits",
)


def output_channel_axis(op_type: str, weight_ndim: int, trans_b: bool = False) -> int | None:
    """The axis of a layer's weight that indexes its output channels (None: no single one)."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return 1 if weight_ndim == 2 else None


def fuses_to_integer(*bits: int) -> bool:
    """Whether ONNX Runtime's CPU provider runs a group whose Q/DQ grids are ``bits`` wide (a
    layer's weight and activation bits, the sites on both sides of a pass-through op, or
    every site of a plan) as integer kernels: only when every grid is 8 bits, the one width
    its kernels take.  A fused layer also requantizes its output where its op is in
    REQUANTIZED_OUTPUT_OPS.  The rule is by grid width; ONNX Runtime sees container types,
    so a sub-8-bit grid that the plan stores in an 8-bit container (``wide``) beside 8-bit
    weights can still reach an integer Gemm or MatMul with a float output."""
    return all(b == INTEGER_KERNEL_BITS for b in bits)


def folds_clip_into_quantize(act_bits: int) -> bool:
    """Whether ONNX Runtime drops a Clip (or Relu) into the QuantizeLinear after it at this
    activation width: for 8-bit and wider integer types, whose QuantizeLinear saturates at
    the Clip's bounds once its range lies within them; not for 4-bit zero points."""
    return act_bits >= INTEGER_KERNEL_BITS
