"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization"): remove the mean
output shift that weight quantization causes.

For a layer y = W x + b with quantized weights W_q = W + dW, the expected error of output
channel c over the calibration data is E[dW x]_c = sum_k dW[c, k] E[x_k] (for a Conv the
sum runs over the input channels of c's group and the kernel, ignoring padded borders).
The corrected bias is b - E[dW x].  E[x] is the per-channel mean of the layer's float
input, observed during calibration.
"""
from __future__ import annotations

import numpy as np

from .qmath import fake_quantize


def output_shift(op_type: str, delta: np.ndarray, input_mean: np.ndarray, *, group: int = 1, trans_b: bool = True) -> np.ndarray:
    """E[dW x] per output channel of a Conv ([M, C/group, kh, kw] weights) or Gemm
    ([N, K] with transB, else [K, N]) whose input has per-channel means ``input_mean``."""
    delta = np.asarray(delta, np.float64)
    mean = np.asarray(input_mean, np.float64)
    if op_type == "Conv":
        per_input = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # [M, C/group]
        groups = mean.reshape(group, -1)  # [group, C/group]
        out_per_group = delta.shape[0] // group
        return np.concatenate([per_input[g * out_per_group:(g + 1) * out_per_group] @ groups[g] for g in range(group)])
    return delta @ mean if trans_b else mean @ delta


def corrected_bias(site, bias: np.ndarray, weight: np.ndarray, qp, input_mean: np.ndarray) -> np.ndarray:
    """``bias`` of the layer of ``site`` (a plan BiasSite) minus the mean output shift that
    quantizing ``weight`` with ``qp`` causes for inputs of per-channel mean ``input_mean``."""
    delta = fake_quantize(weight, qp.scale, qp.zero_point, qp.fmt, qp.axis, qp.block_size) - weight
    shift = output_shift(site.op_type, delta, input_mean, group=site.group, trans_b=site.trans_b)
    return (bias - shift).astype(np.float32)
