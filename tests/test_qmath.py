"""qmath (numpy Q/DQ maths) is bit-exact with ONNX Runtime's QuantizeLinear/DequantizeLinear."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import make_model, ort_run
from onnx_lapq.qmath import QFormat, dequantize, fake_quantize, quantize, scale_zero_point

# (bits, signed, ONNX element type, opset that has it)
FORMATS = [
    pytest.param(8, False, TensorProto.UINT8, 13, id="uint8"),
    pytest.param(8, True, TensorProto.INT8, 13, id="int8"),
    pytest.param(4, True, TensorProto.INT4, 21, id="int4"),
    pytest.param(4, False, TensorProto.UINT4, 21, id="uint4"),
    pytest.param(16, True, TensorProto.INT16, 21, id="int16"),
    pytest.param(16, False, TensorProto.UINT16, 21, id="uint16"),
]


def ort_qdq(x, scale, zero_point, elem_type, opset, axis=None):
    """(codes as int64 or None for 4-bit, dequantized float32) from ORT's Q -> DQ in a tiny graph."""
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point, np.int64)
    zp_tensor = helper.make_tensor("zp", elem_type, zp.shape, zp.ravel().tolist())
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs),
    ]
    four_bit = elem_type in (TensorProto.INT4, TensorProto.UINT4)
    outputs = [("y", TensorProto.FLOAT, list(x.shape))] + ([] if four_bit else [("q", elem_type, list(x.shape))])
    model = make_model(nodes, [("x", TensorProto.FLOAT, list(x.shape))], outputs, {"s": scale, "zp": zp_tensor}, opset=opset)
    result = ort_run(model, {"x": x.astype(np.float32)}, optimize=False)
    return (None if four_bit else result[1].astype(np.int64)), result[0]


def full_range(bits, signed):
    """The format ONNX saturates to: every code of the container."""
    return QFormat(bits, signed=signed, symmetric=False)


def test_qformat_ranges():
    assert (QFormat(8, True, False).qmin, QFormat(8, True, False).qmax) == (-128, 127)
    assert (QFormat(8, True, True).qmin, QFormat(8, True, True).qmax) == (-127, 127)
    assert (QFormat(8, False, False).qmin, QFormat(8, False, False).qmax) == (0, 255)
    assert (QFormat(4, True, True).qmin, QFormat(4, True, True).qmax) == (-7, 7)
    assert (QFormat(3, False, False).qmin, QFormat(3, False, False).qmax) == (0, 7)
    assert QFormat(16, True, False).levels == 65535


def _zero_point(bits, signed):
    fmt = full_range(bits, signed)
    return (fmt.qmin + fmt.qmax) // 2 + (3 if bits > 4 else 1)  # nonzero, off-centre


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x / s for x = 3e38
@pytest.mark.parametrize("bits, signed, elem, opset", FORMATS)
def test_per_tensor_matches_ort(bits, signed, elem, opset):
    rng = np.random.default_rng(bits * 2 + signed)
    fmt = full_range(bits, signed)
    scale = np.float32(6.0 / fmt.levels * 1.37)
    zp = _zero_point(bits, signed)
    ties = (np.arange(-40, 40) + 0.5).astype(np.float32) * scale  # close to k + 0.5 after division
    x = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * 4,
        ties,
        np.array([0.0, -0.0, 1e6, -1e6, 3e38, -3e38, scale * (fmt.qmax - zp), scale * (fmt.qmin - zp)], np.float32),
    ]).astype(np.float32)
    codes_ort, y_ort = ort_qdq(x, scale, zp, elem, opset)
    codes = quantize(x, scale, zp, fmt)
    if codes_ort is not None:
        np.testing.assert_array_equal(codes, codes_ort)
    y = dequantize(codes, scale, zp)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y_ort)
    np.testing.assert_array_equal(fake_quantize(x, scale, zp, fmt), y_ort)


@pytest.mark.parametrize("bits, signed, elem, opset", FORMATS)
def test_exact_ties_round_half_to_even(bits, signed, elem, opset):
    fmt = full_range(bits, signed)
    scale = np.float32(0.25)  # power of two: x / s is exactly k + 0.5
    zp = _zero_point(bits, signed)
    k = np.arange(fmt.qmin - zp, fmt.qmax - zp).clip(-300, 300)
    x = ((k + 0.5) * 0.25).astype(np.float32)
    assert np.all(x / scale == k + 0.5)
    expected = np.where(k % 2 == 0, k, k + 1) + zp  # the even one of k, k + 1
    codes = quantize(x, scale, zp, fmt)
    np.testing.assert_array_equal(codes, expected)
    codes_ort, y_ort = ort_qdq(x, scale, zp, elem, opset)
    if codes_ort is not None:
        np.testing.assert_array_equal(codes_ort, expected)
    np.testing.assert_array_equal(dequantize(codes, scale, zp), y_ort)


@pytest.mark.parametrize("bits, signed, elem, opset", FORMATS)
def test_saturation(bits, signed, elem, opset):
    fmt = full_range(bits, signed)
    zp = _zero_point(bits, signed)
    x = np.array([-1e30, -1e4, -1e3, 1e3, 1e4, 1e30], np.float32)
    codes = quantize(x, 0.01, zp, fmt)
    np.testing.assert_array_equal(codes, [fmt.qmin] * 3 + [fmt.qmax] * 3)
    codes_ort, y_ort = ort_qdq(x, 0.01, zp, elem, opset)
    np.testing.assert_array_equal(dequantize(codes, 0.01, zp), y_ort)


def test_symmetric_format_drops_most_negative_code():
    fmt = QFormat(8, signed=True, symmetric=True)
    assert quantize(np.float32(-1000.0), 1.0, 0, fmt) == -127
    assert quantize(np.float32(1000.0), 1.0, 0, fmt) == 127


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits, signed, elem, opset", [FORMATS[0], FORMATS[1], FORMATS[2]])
def test_per_axis_matches_ort(axis, bits, signed, elem, opset):
    rng = np.random.default_rng(10 + axis)
    fmt = full_range(bits, signed)
    x = (rng.standard_normal((3, 4, 5)) * 3).astype(np.float32)
    channels = x.shape[axis]
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32) * (6.0 / fmt.levels)
    zp = rng.integers(fmt.qmin + 1, fmt.qmax, channels)
    codes_ort, y_ort = ort_qdq(x, scale, zp, elem, opset, axis=axis)
    codes = quantize(x, scale, zp, fmt, axis=axis)
    if codes_ort is not None:
        np.testing.assert_array_equal(codes, codes_ort)
    np.testing.assert_array_equal(dequantize(codes, scale, zp, axis=axis), y_ort)
    # each channel really used its own scale and zero point
    for c in range(channels):
        sl = np.take(x, c, axis=axis)
        np.testing.assert_array_equal(np.take(codes, c, axis=axis), quantize(sl, scale[c], zp[c], fmt))


# --------------------------------------------------------------------------- scale_zero_point


@pytest.mark.parametrize("fmt", [QFormat(8, False, False), QFormat(8, True, False), QFormat(4, False, False), QFormat(3, True, False), QFormat(16, True, False)])
@pytest.mark.parametrize("lo, hi", [(-1.3, 2.7), (-5.0, 0.01), (0.3, 4.0), (-7.0, -2.0)])
def test_zero_is_exactly_representable(fmt, lo, hi):
    scale, zp = scale_zero_point(lo, hi, fmt)
    assert scale.dtype == np.float32 and scale > 0
    assert fmt.qmin <= int(zp) <= fmt.qmax
    assert quantize(np.float32(0.0), scale, zp, fmt) == zp
    assert fake_quantize(np.float32(0.0), scale, zp, fmt) == 0.0
    # the grid spans the range widened to contain 0 (within half a step at each end)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    assert dequantize(fmt.qmin, scale, zp) <= lo0 + scale / 2 + 1e-6
    assert dequantize(fmt.qmax, scale, zp) >= hi0 - scale / 2 - 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_gives_zero_zero_point(bits):
    signed = QFormat(bits, signed=True, symmetric=True)
    scale, zp = scale_zero_point(-3.0, 1.5, signed)
    assert zp == 0
    assert np.isclose(scale, 3.0 / (2 ** (bits - 1) - 1), rtol=1e-6)
    unsigned = QFormat(bits, signed=False, symmetric=True)
    scale, zp = scale_zero_point(0.0, 1.5, unsigned)
    assert zp == 0 and np.isclose(scale, 1.5 / (2**bits - 1), rtol=1e-6)


@pytest.mark.parametrize("fmt", [QFormat(8, False, False), QFormat(8, True, True), QFormat(4, True, False)])
def test_degenerate_range_gives_unit_scale(fmt):
    scale, zp = scale_zero_point(0.0, 0.0, fmt)
    assert scale == 1.0
    assert fake_quantize(np.float32(0.0), scale, zp, fmt) == 0.0


def test_scale_zero_point_per_channel_arrays():
    fmt = QFormat(8, signed=True, symmetric=True)
    lo = np.array([-1.0, -0.0, -4.0])
    hi = np.array([2.0, 0.0, 1.0])
    scale, zp = scale_zero_point(lo, hi, fmt)
    assert scale.shape == (3,) and zp.shape == (3,) and zp.dtype == np.int64
    np.testing.assert_allclose(scale, [2.0 / 127, 1.0, 4.0 / 127], rtol=1e-6)
    assert not zp.any()
