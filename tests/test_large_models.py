"""Models over protobuf's 2 GB limit, simulated on small models.

A real model over 2 GB cannot be built in a unit test (tools/big_model.py runs one).  Here
``limit`` lowers largemodel.PROTOBUF_LIMIT below the digits CNN's size and makes the
tools that take a model as bytes refuse one over the lowered limit, as protobuf refuses one
over 2 GB ("Failed to serialize proto"): onnx's shape inference, version converter and
function inliner, and ONNX Runtime's InferenceSession.  They still run for real on models under the limit.  The
large-model paths must then give what the normal paths give.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import inliner, numpy_helper, version_converter

from conftest import DIGITS_CALIB, DIGITS_MODEL, make_model
from onnx_lapq import QuantConfig, largemodel, modelio, quantize
from onnx_lapq.runtime import session
from onnx_lapq.graph import INT4_OPSET, MIN_OPSET, normalize

LIMIT = 20_000  # bytes: the digits CNN is about 62 kB, its largest weight 37 kB


def _refusing(function, size_of):
    def guarded(model, *args, **kwargs):
        if size_of(model) > LIMIT:
            raise ValueError("Failed to serialize proto")
        return function(model, *args, **kwargs)
    return guarded


def _proto_size(model) -> int:
    return model.ByteSize() if isinstance(model, onnx.ModelProto) else 0


def _lower_limit(patch: pytest.MonkeyPatch, temporary) -> None:
    """PROTOBUF_LIMIT lowered to LIMIT and enforced where protobuf enforces 2 GB; temporary
    files go to ``temporary``, to check that none is left."""
    patch.setattr(largemodel, "PROTOBUF_LIMIT", LIMIT)
    patch.setattr(onnx.shape_inference, "infer_shapes", _refusing(onnx.shape_inference.infer_shapes, _proto_size))
    patch.setattr(version_converter, "convert_version", _refusing(version_converter.convert_version, _proto_size))
    patch.setattr(inliner, "inline_local_functions", _refusing(inliner.inline_local_functions, _proto_size))
    patch.setattr(ort, "InferenceSession", _refusing(ort.InferenceSession, lambda m: len(m) if isinstance(m, bytes) else 0))
    patch.setattr(tempfile, "tempdir", str(temporary))


@pytest.fixture
def limit(monkeypatch, tmp_path):
    """The lowered limit for the whole test; the folder of its temporary files."""
    _lower_limit(monkeypatch, tmp_path)
    return tmp_path


def _limited(function, temporary, *args, **kwargs):
    """``function(*args, **kwargs)`` under the lowered limit (the test's own work runs without)."""
    with pytest.MonkeyPatch.context() as patch:
        _lower_limit(patch, temporary)
        return function(*args, **kwargs)


def _digits() -> onnx.ModelProto:
    return onnx.load(str(DIGITS_MODEL))


def _calibration() -> list[dict[str, np.ndarray]]:
    x = np.load(DIGITS_CALIB)["input"][:64]
    return [{"input": x[i:i + 32]} for i in range(0, 64, 32)]


@pytest.mark.parametrize("min_opset", [MIN_OPSET, INT4_OPSET], ids=["opset13", "converted-to-21"])
@pytest.mark.parametrize("linear_as", ["Gemm", "MatMul"], ids=["gemm", "matmul"])
def test_normalize_over_the_limit_gives_the_same_model(min_opset, linear_as, tmp_path):
    expected = normalize(_digits(), min_opset=min_opset, linear_as=linear_as).SerializeToString()
    model = _digits()
    before = model.SerializeToString()
    got = _limited(normalize, tmp_path, model, min_opset=min_opset, linear_as=linear_as)
    assert model.SerializeToString() == before
    assert got.SerializeToString() == expected


def test_split_large_stubs_the_largest_initializers_and_leaves_the_model_alone(limit):
    model = _digits()
    before = model.SerializeToString()
    skeleton, pairs = largemodel.split_large(model)
    assert model.SerializeToString() == before
    assert skeleton.ByteSize() <= LIMIT
    sizes = {t.name: t.ByteSize() for t in model.graph.initializer}
    stubbed = [tensor.name for _, tensor in pairs]
    assert stubbed and min(sizes[n] for n in stubbed) >= max(s for n, s in sizes.items() if n not in stubbed)
    for stub, tensor in pairs:
        assert (stub.name, list(stub.dims), stub.data_type) == (tensor.name, list(tensor.dims), tensor.data_type)
        assert stub.data_location == onnx.TensorProto.EXTERNAL and not stub.HasField("raw_data")
    largemodel.fill_stubs(skeleton, [tensor for _, tensor in pairs])
    assert skeleton.SerializeToString() == before


def test_temporary_model_file_holds_the_model_and_is_removed(limit):
    model = _digits()
    with largemodel.temporary_model_file(*largemodel.split_large(model)) as path:
        assert sorted(os.listdir(os.path.dirname(path))) == ["model.onnx", "model.onnx.data"]
        assert os.path.getsize(path) <= LIMIT
        loaded = onnx.load(path)
    assert os.listdir(limit) == []
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in model.graph.initializer]
    for got, want in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))


@pytest.mark.parametrize("optimize", [True, False])
def test_session_over_the_limit_runs_the_model(optimize, tmp_path):
    model = _digits()
    x = _calibration()[0]
    inner = [model.graph.node[0].output[0]]  # an extra output, as calibration asks
    limited = _limited(session, tmp_path, model, outputs=inner, optimize=optimize)
    assert os.listdir(tmp_path) == []  # ONNX Runtime has read the file: it is gone, the session still runs
    expected = session(model, outputs=inner, optimize=optimize).run(None, x)
    got = limited.run(None, x)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(weight_only=True, weight_bits=4)], ids=["W8A8", "weight-only-W4"])
def test_quantize_over_the_limit_gives_the_same_model(config, tmp_path):
    expected = quantize(_digits(), _calibration(), config=config)
    got = _limited(quantize, tmp_path, _digits(), _calibration(), config=config)
    assert os.listdir(tmp_path) == []
    assert got.model.SerializeToString() == expected.model.SerializeToString()
    assert got.fidelity == expected.fidelity


def test_model_size_is_exact_without_serializing_the_data(monkeypatch):
    """Over the limit protobuf refuses even to size a model (upb serializes it to measure
    it): the size comes from the rest of the model and the initializers' dims, exactly, for
    float, packed 4-bit and typed-field (int32_data) initializers alike."""
    model = _digits()
    quantized = quantize(model, _calibration(), config=QuantConfig(weight_bits=4, act_bits=8)).model
    typed = onnx.helper.make_tensor("typed", onnx.TensorProto.INT32, [3], [1, -2, 300])
    quantized.graph.initializer.append(typed)
    for m in (model, quantized):
        assert largemodel.model_size(m) == m.ByteSize()
    assert not largemodel.over_protobuf_limit(model)
    monkeypatch.setattr(largemodel, "PROTOBUF_LIMIT", LIMIT)
    assert largemodel.over_protobuf_limit(model)
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", lambda self: pytest.fail("model_size serialized the model"))
    assert largemodel.model_size(model) == onnx.ModelProto.ByteSize(model)


def test_session_over_the_limit_packs_a_typed_int4_initializer(tmp_path):
    """An initializer held in int32_data (not raw_data) goes to the external data file as
    raw data holds it: 4-bit values two to a byte."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (64, 512))
    weight = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, codes.shape, codes.reshape(-1).tolist())
    assert not weight.HasField("raw_data") and weight.ByteSize() > LIMIT
    nodes = [
        onnx.helper.make_node("DequantizeLinear", ["w", "scale"], ["w_float"]),
        onnx.helper.make_node("MatMul", ["x", "w_float"], ["y"]),
    ]
    model = make_model(nodes, [("x", onnx.TensorProto.FLOAT, ["N", 64])], [("y", onnx.TensorProto.FLOAT, ["N", 512])],
                       {"w": weight, "scale": np.float32(0.1)}, opset=21)
    x = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    got = _limited(session, tmp_path, model).run(None, x)[0]
    np.testing.assert_array_equal(got, session(model).run(None, x)[0])


def test_saved_model_over_the_limit_loads_in_onnx_runtime(tmp_path):
    """Over the limit the model file holds the skeleton and ``<out>.data`` the stubs' data;
    plain ONNX Runtime, all optimizations, loads it and computes what the model computes."""
    model = _digits()
    target = tmp_path / "out.onnx"
    _limited(modelio.save_model_atomic, tmp_path, model, str(target))
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert target.stat().st_size <= LIMIT
    x = _calibration()[0]
    saved = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(saved, session(model).run(None, x)[0])


def test_a_tensor_over_the_limit_on_its_own_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(largemodel, "TENSOR_LIMIT", 20_000)  # the digits CNN's largest weight is about 37 kB
    with pytest.raises(largemodel.ModelError, match=r"initializer '[^']+' holds .* GiB, over the 2 GiB that protobuf can copy"):
        quantize(_digits(), _calibration())


def test_local_functions_of_a_model_over_the_limit_are_inlined_on_its_skeleton(tmp_path):
    from onnx import helper
    swish = helper.make_function("com.example", "Swish", ["X"], ["Y"],
                                 [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
                                 [helper.make_opsetid("", 13)])
    weights = {f"W{i}": np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) / 8 for i in range(3)}  # 16 kB each
    nodes = [helper.make_node("Swish", ["x"], ["s"], name="act", domain="com.example")]
    nodes += [helper.make_node("MatMul", ["s" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"], name=f"mm{i}") for i in range(3)]
    model = make_model(nodes, [("x", onnx.TensorProto.FLOAT, ["N", 64])], [("h2", onnx.TensorProto.FLOAT, ["N", 64])], weights,
                       extra_opsets=[("com.example", 1)], check=False)
    model.functions.append(swish)
    expected = normalize(model, min_opset=INT4_OPSET)
    got = _limited(normalize, tmp_path, model, min_opset=INT4_OPSET)
    assert not got.functions and got.SerializeToString() == expected.SerializeToString()
