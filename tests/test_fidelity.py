"""The exported model's fidelity to the float model on calibration samples: in the result,
the report and the CLI summary, computed (checked here against ONNX Runtime run
independently), and a warning with remedies when it is poor."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import DIGITS_CALIB, DIGITS_HELDOUT, DIGITS_MODEL, Net, run_cli
from onnx_lapq import QuantConfig, quantize
from onnx_lapq.fidelity import KEPT_SAMPLES, POOR_COSINE, remedies
from onnx_lapq import LapqOptions


def outputs(model, inputs: np.ndarray) -> np.ndarray:
    """The first output of a model (path or ModelProto) on ``inputs``, in plain ONNX Runtime."""
    source = str(model) if not isinstance(model, onnx.ModelProto) else model.SerializeToString()
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: inputs})[0].astype(np.float64)


def top1_agreement(reference: np.ndarray, quantized: np.ndarray) -> float:
    return float(np.mean(reference.argmax(axis=1) == quantized.argmax(axis=1)))


def kl(reference: np.ndarray, quantized: np.ndarray) -> float:
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p, log_q = log_softmax(reference), log_softmax(quantized)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def digits_calibration(n: int | None = None) -> np.ndarray:
    return np.load(DIGITS_CALIB)["input"][:n]


def digits_quantized(caplog, calibration: np.ndarray, **config):
    with caplog.at_level(logging.WARNING, logger="onnx_lapq"):
        return quantize(onnx.load(str(DIGITS_MODEL)), [{"input": calibration}], config=QuantConfig(**config))


def fidelity_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "onnx_lapq.fidelity"]


def test_digits_w8a8_agrees_with_fp32_and_does_not_warn(caplog):
    calib = digits_calibration()
    result = digits_quantized(caplog, calib)
    fidelity = result.fidelity
    head = calib[:KEPT_SAMPLES]  # the first samples are measured
    reference, quantized = outputs(DIGITS_MODEL, head), outputs(result.model, head)
    assert fidelity.samples == KEPT_SAMPLES < len(calib)
    assert fidelity.loss_kind == "kl" and fidelity.cosine is None
    assert fidelity.top1_agreement == top1_agreement(reference, quantized) >= 0.97
    assert fidelity.loss == pytest.approx(kl(reference, quantized), rel=1e-3)
    assert not fidelity.poor and fidelity_warnings(caplog) == []
    assert result.report["fidelity"] == fidelity.as_report()
    assert json.loads(json.dumps(result.report["fidelity"])) == fidelity.as_report()


def test_digits_w2a2_minmax_warns_with_remedies_in_order(caplog):
    calib = digits_calibration()
    result = digits_quantized(caplog, calib, weight_bits=2, act_bits=2)
    head = calib[:KEPT_SAMPLES]
    agreement = top1_agreement(outputs(DIGITS_MODEL, head), outputs(result.model, head))
    assert result.fidelity.top1_agreement == agreement < 0.9 and result.fidelity.poor
    [warning] = fidelity_warnings(caplog)
    assert f"top-1 agrees with FP32 on {100 * agreement:.1f}%" in warning
    hints = ["--method lapq", "--weight-bits 4 --act-bits 4", "--keep-first-last-8bit", "--exclude", "more calibration samples (this run used 256)"]
    positions = [warning.index(h) for h in hints]
    assert positions == sorted(positions)


def test_cli_w2a2_minmax_warns_on_stderr_and_ends_the_summary_with_fidelity(tmp_path):
    out, report = tmp_path / "digits.w2.onnx", tmp_path / "report.json"
    proc = run_cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--weight-bits", "2", "--act-bits", "2", "--report", report)
    assert proc.returncode == 0, proc.stderr
    head = digits_calibration(KEPT_SAMPLES)
    agreement = top1_agreement(outputs(DIGITS_MODEL, head), outputs(out, head))
    measured = f"top-1 agrees with FP32 on {100 * agreement:.1f}%"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"fidelity on {KEPT_SAMPLES} calibration samples: {measured}, kl loss ") and last.endswith("(poor: see the warning)")
    warning = [line for line in proc.stderr.splitlines() if line.startswith("WARNING onnx_lapq.fidelity:")]
    assert len(warning) == 1 and measured in warning[0] and "likely remedies, in order: the loss-aware search (--method lapq)" in warning[0]
    assert json.loads(report.read_text())["fidelity"]["top1_agreement"] == agreement


def test_cli_w8a8_summary_ends_with_fidelity_and_no_warning(tmp_path):
    proc = run_cli(DIGITS_MODEL, tmp_path / "digits.onnx", "--calib", DIGITS_CALIB)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"fidelity on {KEPT_SAMPLES} calibration samples: top-1 agrees with FP32 on ") and "poor" not in last
    assert "WARNING" not in proc.stderr


@pytest.mark.parametrize("calibrated", [False, True], ids=["no-calib", "calib"])
def test_cli_weight_only_summary_counts_no_calibration_and_says_whether_fidelity_was_measured(tmp_path, calibrated):
    calib = ["--calib", DIGITS_CALIB] if calibrated else []
    proc = run_cli(DIGITS_MODEL, tmp_path / "digits.w4.onnx", "--weight-only", "--weight-bits", "4", *calib)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "activation site" not in lines[0] and "calibration samples" not in lines[0]
    if calibrated:
        assert lines[-1].startswith(f"fidelity on {KEPT_SAMPLES} calibration samples: top-1 agrees with FP32 on ")
    else:
        assert lines[-1] == "fidelity not measured: no calibration data (--calib measures it)"


def test_measured_on_the_first_samples_only():
    data = np.load(DIGITS_HELDOUT)["input"]  # 300 samples, more than are measured, in batches that do not end at KEPT_SAMPLES
    assert len(data) > KEPT_SAMPLES
    result = quantize(onnx.load(str(DIGITS_MODEL)), [{"input": data}], config=QuantConfig(weight_bits=3, act_bits=3, batch_size=48))
    head = data[:KEPT_SAMPLES]
    assert result.report["calibration_samples"] == len(data)
    assert result.fidelity.samples == KEPT_SAMPLES
    assert result.fidelity.top1_agreement == top1_agreement(outputs(DIGITS_MODEL, head), outputs(result.model, head))


def test_lapq_fidelity_is_the_search_loss_of_the_exported_model():
    result = quantize(
        onnx.load(str(DIGITS_MODEL)), [{"input": digits_calibration(KEPT_SAMPLES)}],  # the search's samples are the ones measured
        config=QuantConfig(weight_bits=4, act_bits=4, method="lapq", lapq=LapqOptions(max_evals=12)),
    )
    assert result.fidelity.loss_kind == result.report["loss"]
    assert result.fidelity.loss == pytest.approx(result.report["exported_loss"], rel=1e-9)


def embedding_model() -> onnx.ModelProto:
    """Two linear layers and an L2 normalization: a sentence-embedding head."""
    net = Net(np.random.default_rng(7))
    h = net.op("Relu", "relu", [net.matmul("fc1", "x", 32, 64)])
    y = net.op("LpNormalization", "norm", [net.matmul("fc2", h, 64, 16)], axis=-1, p=2)
    return net.model([("x", onnx.TensorProto.FLOAT, ["N", 32])], [(y, onnx.TensorProto.FLOAT, ["N", 16])])


def regression_model() -> onnx.ModelProto:
    """Two linear layers to one value per sample."""
    net = Net(np.random.default_rng(8))
    h = net.op("Relu", "relu", [net.matmul("fc1", "x", 32, 64)])
    y = net.matmul("fc2", h, 64, 1)
    return net.model([("x", onnx.TensorProto.FLOAT, ["N", 32])], [(y, onnx.TensorProto.FLOAT, ["N", 1])])


def cosines(reference: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    return np.sum(reference * quantized, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1))


@pytest.mark.parametrize("config", [dict(weight_bits=4, act_bits=8), dict(weight_bits=4, weight_only=True, block_size=16)], ids=["w4a8", "weight-only"])
def test_embedding_gets_cosine_not_agreement(config):
    model, x = embedding_model(), np.random.default_rng(0).standard_normal((100, 32)).astype(np.float32)
    result = quantize(model, [{"x": x}], config=QuantConfig(**config))
    reference, quantized = outputs(model, x), outputs(result.model, x)
    fidelity = result.fidelity
    assert fidelity.loss_kind == "cosine" and fidelity.top1_agreement is None and "top1_agreement" not in result.report["fidelity"]
    assert fidelity.cosine == pytest.approx(np.mean(cosines(reference, quantized)), abs=1e-6)
    assert fidelity.loss == pytest.approx(1.0 - np.mean(cosines(reference, quantized)), abs=1e-6)
    assert 0.9 < fidelity.cosine < 1.0


def test_one_value_per_sample_gets_the_cosine_of_the_column(caplog):
    model, x = regression_model(), np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="onnx_lapq"):
        result = quantize(model, [{"x": x}], config=QuantConfig(weight_bits=2, act_bits=2, weights="nearest"))
    reference, quantized = outputs(model, x).ravel(), outputs(result.model, x).ravel()
    column = reference @ quantized / (np.linalg.norm(reference) * np.linalg.norm(quantized))
    assert result.fidelity.loss_kind == "mse"
    assert result.fidelity.cosine == pytest.approx(column, abs=1e-6)
    assert column < POOR_COSINE and result.fidelity.poor  # two bits are far too few here
    [warning] = fidelity_warnings(caplog)
    assert f"mean cosine similarity to FP32 {column:.4f}" in warning


def test_weight_only_remedies_name_weight_only_flags():
    fixes = " ".join(remedies(QuantConfig(weight_bits=4, weight_only=True, block_size=32), 64))
    assert "--weight-bits 8" in fixes and "--block-size 16" in fixes and "--method mse" in fixes
    assert "--method lapq" not in fixes and "--act-bits" not in fixes and "calibration samples" not in fixes
    assert "--method lapq" not in " ".join(remedies(QuantConfig(weight_bits=2, act_bits=2, method="lapq"), 64))


def test_head_reads_no_batch_past_the_kept_samples(monkeypatch):
    import onnx_lapq.fidelity as fidelity
    monkeypatch.setattr(fidelity, "KEPT_BYTES", 3 * 4 * 64 * 4)  # three batches of 4 samples of 64 float32
    read = []

    def batches():
        for i in range(100):
            read.append(i)
            yield {"x": np.full((4, 64), i, np.float32)}

    kept = fidelity.head(batches())
    assert [int(b["x"][0, 0]) for b in kept] == [0, 1, 2]  # the first samples, as many as the bytes allow
    assert len(read) == 4  # the batch that did not fit ends the reading
    monkeypatch.setattr(fidelity, "KEPT_BYTES", 1 << 30)
    read.clear()
    assert sum(len(b["x"]) for b in fidelity.head(batches())) == KEPT_SAMPLES and len(read) == KEPT_SAMPLES // 4
