"""Same inputs and seed, same bytes (every calibration method and both lapq searches); every
calibration form gives the same model and a bad one is named; inputs are never modified."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx import TensorProto

from conftest import DIGITS_CALIB, DIGITS_MODEL, Net, block_model, conv_chain_model, digits, lapq_config, make_model, random_inputs
from conftest import run_cli as cli
from onnx_lapq import CalibrationError, CalibrationOptions, ModelError, QuantConfig, quantize

METHODS = ["minmax", "entropy", "mse", "percentile"]


@pytest.mark.parametrize("method", ["minmax", "entropy"])
@pytest.mark.slow
def test_cli_runs_give_identical_bytes(tmp_path, method):
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}.onnx"
        proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--method", method, "--num-samples", "96", "--seed", "3")
        assert proc.returncode == 0, proc.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 1000


@pytest.mark.parametrize("method", METHODS)
def test_api_runs_give_identical_bytes(method):
    model = block_model()
    config = QuantConfig(method=method, weight_bits=4, act_bits=4, seed=5)
    first = quantize(model, random_inputs(model, 48, batch=16), config=config)
    second = quantize(model, random_inputs(model, 48, batch=16), config=config)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731  (timings differ)
    assert strip(first.report) == strip(second.report)


def test_methods_really_differ():
    """The determinism tests above would pass trivially if method were ignored."""
    model = block_model()
    data = random_inputs(model, 48)
    configs = {m: QuantConfig(method=m, weight_bits=4, act_bits=4, calibration=CalibrationOptions(percentile=99.0)) for m in METHODS}
    blobs = {m: quantize(model, data, config=c).model.SerializeToString() for m, c in configs.items()}
    assert len(set(blobs.values())) == len(METHODS)


@pytest.mark.parametrize("search", ["powell", "coordinate"])
@pytest.mark.slow
def test_lapq_is_deterministic(search):
    model, calib = digits()
    a = quantize(model, calib, config=lapq_config(search=search, max_evals=60))
    b = quantize(model, calib, config=lapq_config(search=search, max_evals=60))
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.report["final_loss"] == b.report["final_loss"]


# --------------------------------------------------------------------------- calibration forms


class Reader:
    """ONNX Runtime's CalibrationDataReader convention: get_next() until None."""

    def __init__(self, items):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_forms_give_same_model(method):
    model = conv_chain_model()
    batches = random_inputs(model, 48, batch=16)
    config = QuantConfig(method=method)
    as_list = quantize(model, batches, config=config).model.SerializeToString()
    as_generator = quantize(model, (b for b in batches), config=config).model.SerializeToString()
    as_reader = quantize(model, Reader(batches), config=config).model.SerializeToString()
    one_batch = quantize(model, [{"x": np.concatenate([b["x"] for b in batches])}], config=config).model.SerializeToString()
    assert as_list == as_generator == as_reader == one_batch
    # and the data matter: other samples give another model
    other = quantize(model, random_inputs(model, 48, seed=1), config=config).model.SerializeToString()
    assert other != as_list


def test_npz_files_calibrate_in_a_list_and_are_named_alone():
    model = onnx.load(DIGITS_MODEL)
    as_dict = quantize(model, [dict(np.load(DIGITS_CALIB))]).model.SerializeToString()
    with np.load(DIGITS_CALIB) as npz:
        assert quantize(model, [npz]).model.SerializeToString() == as_dict
        with pytest.raises(CalibrationError, match="np.load of an .npz"):
            quantize(model, npz)


def test_a_spent_generator_is_named_as_the_cause_of_empty_calibration():
    model = conv_chain_model()
    batches = (b for b in random_inputs(model, 16))
    quantize(model, batches)
    with pytest.raises(CalibrationError, match="read to its end gives none"):
        quantize(model, batches)


def test_num_samples_limits_calibration():
    model = conv_chain_model()
    batches = random_inputs(model, 64, batch=16)
    limited = quantize(model, batches, config=QuantConfig(num_samples=20))
    assert limited.report["calibration_samples"] == 20
    first_20 = quantize(model, [{"x": batches[0]["x"]}, {"x": batches[1]["x"][:4]}])
    assert limited.model.SerializeToString() == first_20.model.SerializeToString()


def test_quantize_rejects_a_path():
    with pytest.raises(ModelError, match="onnx.load"):
        quantize(str(DIGITS_MODEL), [])


@pytest.mark.parametrize("bad", [{"x": np.zeros((4, 3, 8, 8), np.float32)}, "calib.npz", 42])
def test_quantize_rejects_bad_calibration_containers(bad):
    with pytest.raises(CalibrationError):
        quantize(conv_chain_model(), bad)


# --------------------------------------------------------------------------- inputs untouched


def bn_opset11_model():
    """Needs BN folding and an opset conversion: the two places a careless pass edits its input."""
    net = Net(np.random.default_rng(9))
    h = net.op("Relu", "relu1", [net.bn("bn1", net.conv("conv1", "x", 3, 4), 4)])
    net.conv("conv2", h, 4, 2)
    return make_model(net.nodes, [("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [("conv2", TensorProto.FLOAT, ["N", 2, 8, 8])], net.inits, opset=11)


@pytest.mark.parametrize("model_fn", [block_model, bn_opset11_model])
@pytest.mark.parametrize("bits", [8, 4])
def test_input_model_not_modified(model_fn, bits):
    model = model_fn()
    data = random_inputs(model, 16)
    before = model.SerializeToString()
    data_before = [d["x"].copy() for d in data]
    result = quantize(model, data, config=QuantConfig(weight_bits=bits, act_bits=bits))
    assert model.SerializeToString() == before
    for d, copy in zip(data, data_before):
        np.testing.assert_array_equal(d["x"], copy)
    assert result.model.SerializeToString() != before
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    onnx.checker.check_model(result.model)
