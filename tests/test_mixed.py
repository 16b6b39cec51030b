"""Mixed precision as a stage: widths under a budget, read back from the exported model."""
from __future__ import annotations

import subprocess
import sys

import pytest

import onnx_lapq
from conftest import DIGITS_CALIB, DIGITS_MODEL, digits
from onnx_lapq import ConfigError, QuantConfig
from onnx_lapq.inspect import inspect_model
from onnx_lapq import MixedPrecisionOptions

CANDIDATES = (2, 3, 4, 8)


def _mixed(budget: dict, **config):
    model, calibration = digits()
    options = MixedPrecisionOptions(candidate_bits=CANDIDATES, **budget)
    return onnx_lapq.quantize(model, calibration, config=QuantConfig(weights="nearest", method="mse", mixed_precision=options, **config))


def _float_weights() -> dict[str, int]:
    model, _ = digits()
    return {f.node: f.weight_bytes // 4 for f in inspect_model(onnx_lapq.graph.normalize(model))}


@pytest.mark.parametrize("bits", [4.0, 3.0])
def test_average_bits_within_the_budget_and_a_lower_loss_than_uniform_widths(bits):
    result = _mixed({"target_bits": bits})
    counts = _float_weights()
    facts = inspect_model(result.model)
    assert sum(f.weight_bits * counts[f.node] for f in facts) <= bits * sum(counts.values())
    assert len({f.weight_bits for f in facts}) > 1
    record = next(r for r in result.stages if r.stage == "mixed_precision")
    assert {f.node: f.weight_bits for f in facts} == record.widths
    model, calibration = digits()
    uniform = onnx_lapq.quantize(model, calibration, config=QuantConfig(weight_bits=int(bits), weights="nearest", method="mse"))
    assert result.fidelity.loss < uniform.fidelity.loss


def test_target_size_counts_the_stored_bytes():
    result = _mixed({"target_size": 0.15})
    stored = sum(f.weight_bytes for f in inspect_model(result.model))
    assert stored <= 0.15 * 4 * sum(_float_weights().values())


def test_infeasible_budgets_and_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"target_size=0.01 is below the smallest model .* give at least 0\.1\d+"):  # 2- and 3-bit codes take int8 containers
        _mixed({"target_size": 0.01})
    with pytest.raises(ConfigError, match="give at least 2"):
        _mixed({"target_bits": 1.5})
    with pytest.raises(ConfigError, match="one budget"):
        MixedPrecisionOptions(candidate_bits=CANDIDATES)
    with pytest.raises(ConfigError, match="widest of candidate_bits"):
        QuantConfig(weight_bits=4, mixed_precision=MixedPrecisionOptions(candidate_bits=CANDIDATES, target_bits=3.0))
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_lapq", str(DIGITS_MODEL), str(out), "--calib", str(DIGITS_CALIB),
                           "--weight-bits", "2,4,8", "--target-size", "0.01"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--target-size 0.01 is below" in proc.stderr and not out.exists()
