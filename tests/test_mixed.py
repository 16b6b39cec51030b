"""Mixed precision as a stage: widths under a budget, read back from the exported model."""
from __future__ import annotations

import importlib.util
import json
import operator
import subprocess
import sys

import onnx

import pytest

import onnx_lapq
from conftest import DIGITS_CALIB, DIGITS_MODEL, digits
from onnx_lapq import ConfigError, QuantConfig
from onnx_lapq.inspect import inspect_model
from onnx_lapq import MixedPrecisionOptions

CANDIDATES = (2, 3, 4, 8)


def _mixed(options: dict, **config):
    """The digits CNN under mixed precision with ``options`` (a budget and any other MixedPrecisionOptions)."""
    model, calibration = digits()
    options = MixedPrecisionOptions(candidate_bits=CANDIDATES, **options)
    return onnx_lapq.quantize(model, calibration, config=QuantConfig(**{"weights": "nearest", "method": "mse", "mixed_precision": options, **config}))


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
    proc = subprocess.run([sys.executable, "-m", "onnx_lapq", str(DIGITS_MODEL), str(out), "--calib", str(DIGITS_CALIB),
                           "--weight-bits", "2,4,8", "--max-loss-ratio", "0.9"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--max-loss-ratio 0.9 is below" in proc.stderr and "give at least 1" in proc.stderr
    assert not out.exists()


def _record(result):
    return next(r for r in result.stages if r.stage == "mixed_precision")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_the_same_bytes_from_every_executor(ray_instance):
    runs = {spec: _mixed({"target_bits": 3.0, "executor": spec}) for spec in ("inline", "local:2", "ray")}
    inline = runs.pop("inline")
    for spec, result in runs.items():
        assert _record(result).sensitivities == _record(inline).sensitivities, spec
        assert result.model.SerializeToString() == inline.model.SerializeToString(), spec


@pytest.mark.parametrize("weights", ["nearest", "gptq"])
def test_a_loss_bound_keeps_the_smallest_allocation_within_it(weights):
    result = _mixed({"max_loss_ratio": 4.0, "executor": "inline"}, weights=weights)
    record = _record(result)
    assert record.bound == pytest.approx(4.0 * record.baseline_loss)
    assert len(record.trials) >= 3 and record.widths in [t.widths for t in record.trials if t.loss <= record.bound]
    smaller_within = [t for t in record.trials if t.loss <= record.bound and t.size < record.size_bytes]
    assert not smaller_within
    if weights == "nearest":  # the exported model, measured with integer weights (with gptq the run fits the weights again, in sequence)
        assert result.fidelity.loss <= record.bound * 1.01
    stored = sum(f.weight_bytes for f in inspect_model(result.model))
    uniform = sum(f.weight_bytes for f in inspect_model(onnx_lapq.quantize(*digits(), config=QuantConfig(weights="nearest", method="mse")).model))
    assert stored < uniform
    with pytest.raises(ConfigError, match="give at least 1"):
        MixedPrecisionOptions(candidate_bits=CANDIDATES, max_loss_ratio=0.9)
    with pytest.raises(ConfigError, match="give at least 0"):
        MixedPrecisionOptions(candidate_bits=CANDIDATES, max_loss_increase=-0.01)


def test_interactions_of_graph_neighbours_enter_the_allocation():
    from onnx_lapq.interactions import neighbours
    model = onnx_lapq.graph.normalize(digits()[0])
    result = _mixed({"target_bits": 3.0, "executor": "inline", "interactions": True})
    record = _record(result)
    sites = list(result.plan.weights)
    pairs = neighbours(model, sites)
    assert pairs and len(record.couplings) == len(pairs)
    assert all((sites[l].node, sites[m].node) in record.couplings for l, m in pairs)
    assert any(rho != 0 for rho in record.couplings.values())


def test_cli_writes_the_front_and_a_bits_file_a_later_run_reuses(tmp_path):
    out, front, bits = tmp_path / "out.onnx", tmp_path / "front.json", tmp_path / "bits.json"
    common = [sys.executable, "-m", "onnx_lapq", str(DIGITS_MODEL), str(out), "--calib", str(DIGITS_CALIB), "--weights", "nearest", "--method", "mse"]
    proc = subprocess.run(common + ["--weight-bits", "2,3,4,8", "--max-loss-ratio", "4", "--executor", "inline", "--pareto", str(front),
                                    "--bits-out", str(bits)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(front.read_text())
    assert sum(t["chosen"] for t in report["trials"]) >= 1 and any(t["on_front"] for t in report["trials"])
    assert all(t["loss"] <= report["bound"] for t in report["trials"] if t["chosen"])
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    chosen = {f.node: f.weight_bits for f in inspect_model(onnx.load(out))}
    assert {node: entry["weight_bits"] for node, entry in json.loads(bits.read_text())["layers"].items()} == chosen
    again = tmp_path / "again.onnx"
    proc = subprocess.run(common[:4] + [str(again)] + common[5:] + ["--bits-file", str(bits)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {f.node: f.weight_bits for f in inspect_model(onnx.load(again))} == chosen
    proc = subprocess.run(common + ["--pareto", str(tmp_path / "f2.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--pareto" in proc.stderr and not (tmp_path / "f2.json").exists()


def test_with_reconstruction_the_probes_measure_reconstructed_weights():
    nearest, fitted = (_record(_mixed({"target_bits": 3.0, "executor": "inline"}, weights=w)) for w in ("nearest", "gptq"))
    assert (nearest.probe_weights, fitted.probe_weights) == ("nearest", "gptq")
    narrowest = [(fitted.sensitivities[n][2], nearest.sensitivities[n][2]) for n in nearest.sensitivities]
    assert sum(f for f, _ in narrowest) < 0.5 * sum(r for _, r in narrowest)  # reconstruction recovers most of what 2 bits lose


def test_auto_weights_reconstruct_where_mixed_precision_may_narrow_layers():
    options = MixedPrecisionOptions(candidate_bits=CANDIDATES, target_bits=4.0)
    assert QuantConfig(mixed_precision=options).weight_rounding == "adaround"
    assert QuantConfig().weight_rounding == "nearest"


def test_the_noise_probe_proxy_ranks_layers_and_widths_as_the_measured_sensitivities_do():
    from scipy.stats import spearmanr
    measured = _record(_mixed({"target_bits": 3.0, "executor": "inline"}))
    seen = []
    model, calibration = digits()
    proxy = _record(onnx_lapq.quantize(model, calibration, on_step=seen.append, config=QuantConfig(
        weights="nearest", method="mse", mixed_precision=MixedPrecisionOptions(candidate_bits=CANDIDATES, target_bits=3.0, executor="inline", sensitivity="proxy"))))
    assert proxy.sensitivity == "proxy" and max(p.total for p in seen if p.stage == "mixed_precision") == len(measured.sensitivities)  # a probe a layer
    keys = [(node, bits) for node, by_bits in measured.sensitivities.items() for bits in by_bits]
    rho = spearmanr([measured.sensitivities[n][b] for n, b in keys], [proxy.sensitivities[n][b] for n, b in keys]).statistic
    assert rho > 0.7


def test_layers_whose_narrowing_measures_free_stay_wide_until_the_budget_needs_their_bytes():
    from types import SimpleNamespace

    import numpy as np

    from onnx_lapq.allocation import allocate
    from onnx_lapq.widthcosts import Candidates, costs

    sites = [SimpleNamespace(node=n, bits=8) for n in ("a", "b", "c")]
    measured = {"a": {2: -0.01, 4: -0.02}, "b": {2: 0.0, 4: 0.0}, "c": {2: 0.5, 4: 0.1}}  # a: a reconstructed narrow weight measured below 8 bits
    sizes = np.array([[2.0, 4.0, 8.0]] * 3)
    candidates = Candidates.of((2, 4, 8), (), [None] * 3)
    cost = costs(measured, {}, sites, candidates, sizes, {})
    assert (cost >= 0).all()
    assert allocate(cost, sizes, 24.0).choice == (2, 2, 2)  # room for every layer at 8 bits: all at 8
    assert allocate(cost, sizes, 20.0).choice[2] == 2  # the costly layer keeps its width; the free ones give up bytes
    flat = np.array([[8.0, 8.0, 8.0]] * 3)
    assert allocate(costs(measured, {}, sites, candidates, flat, {}), flat, 24.0).choice == (2, 2, 2)


def test_a_ray_cluster_the_executor_starts_ends_with_its_jobs():
    ray = pytest.importorskip("ray")
    from onnx_lapq.executor import run_jobs
    if ray.is_initialized():
        ray.shutdown()
    assert run_jobs("ray", abs, operator.mul, -3, [1, 2, 5]) == [3, 6, 15]  # functions a Ray worker can import
    assert not ray.is_initialized()


def test_a_bops_budget_counts_each_layers_multiply_accumulates():
    from conftest import conv_chain_model, random_inputs
    from onnx_lapq.bops import input_bits, layer_macs
    model = conv_chain_model()
    result = onnx_lapq.quantize(model, random_inputs(model, 8), config=QuantConfig(weights="nearest", method="mse", act_bits=4,
                                                                                  keep_first_last_8bit=True))
    sites = list(result.plan.weights)
    macs = layer_macs(model, sites, result.solution.weights, random_inputs(model, 2)[0])
    # conv1: 4 x 8 x 8 outputs of 3 x 3 x 3 taps; conv2 (stride 2): 6 x 4 x 4 of 4 x 3 x 3; fc: 10 of 96
    assert dict(zip((s.node for s in sites), macs)) == {"conv1": 256 * 27, "conv2": 96 * 36, "fc": 10 * 96}
    assert list(input_bits(result.plan, model, sites)) == [8, 4, 8]
    record = _record(_mixed({"target_bops": 0.1}))
    assert record.unit == "bops" and record.size_bytes <= record.budget_bytes <= 0.1 * record.float_bytes
    assert "bit operations" in record.summary() and len(set(record.widths.values())) > 1
    with pytest.raises(ConfigError, match=r"target_bops=0.01 is below the fewest bit operations .* give at least 0\.0625"):
        _mixed({"target_bops": 0.01})


def test_input_widths_are_chosen_with_the_weights_under_a_bops_budget():
    """Candidate activation widths (--act-bits 4,8) join the allocation under a BOPs budget:
    the exported model holds the chosen widths (weights and layer inputs), its bit operations
    stay within the budget, the activation probes are in the record and the same from the
    local workers as inline; a size budget cannot price input widths, a budget under every
    layer at its narrowest pair names the least."""
    from onnx_lapq.bops import FLOAT_BITS, layer_macs
    model, calibration = digits()
    options = MixedPrecisionOptions(candidate_bits=(4, 8), candidate_act_bits=(4, 8), target_bops=0.09)
    result = onnx_lapq.quantize(model, calibration, config=QuantConfig(weights="nearest", method="mse", mixed_precision=options))
    record = _record(result)
    assert set(record.act_widths.values()) == {4, 8} and record.act_sensitivities
    assert all(bits for group in record.act_sensitivities.values() for bits in group)
    facts = {f.node: f for f in inspect_model(result.model)}
    assert {n: facts[n].act_bits for n in record.act_widths} == record.act_widths
    assert {n: facts[n].weight_bits for n in record.widths} == record.widths
    sites = list(result.plan.weights)
    batch = {i.name: calibration[0][i.name] for i in model.graph.input}
    macs = layer_macs(onnx_lapq.graph.normalize(model), sites, result.solution.weights, batch)
    used = sum(m * facts[s.node].weight_bits * facts[s.node].act_bits for s, m in zip(sites, macs))
    assert used <= 0.09 * FLOAT_BITS * 8 * macs.sum() * (1 + 1e-9)
    assert "inputs" in record.summary()
    options_inline = MixedPrecisionOptions(candidate_bits=(4, 8), candidate_act_bits=(4, 8), target_bops=0.09, executor="inline")
    inline = onnx_lapq.quantize(model, calibration, config=QuantConfig(weights="nearest", method="mse", mixed_precision=options_inline))
    assert _record(inline).act_sensitivities == record.act_sensitivities  # the local workers' probes, bit for bit
    assert inline.model.SerializeToString() == result.model.SerializeToString()
    from onnx_lapq.bits import bits_file_text
    written = json.loads(bits_file_text(result.plan, result.config.layer_bits))["layers"]
    assert {n: e["act_bits"] for n, e in written.items() if "act_bits" in e} == record.act_widths  # --bits-out keeps them
    with pytest.raises(ConfigError, match="candidate_act_bits need a compute budget, target_bops"):
        MixedPrecisionOptions(candidate_bits=(4, 8), candidate_act_bits=(4, 8), target_size=0.2)
    with pytest.raises(ConfigError, match="act_bits=4 must be the widest of candidate_act_bits"):
        QuantConfig(act_bits=4, mixed_precision=MixedPrecisionOptions(candidate_act_bits=(4, 8), target_bops=0.1))
    with pytest.raises(ConfigError, match=r"give at least 0\.0625"):
        onnx_lapq.quantize(model, calibration, config=QuantConfig(weights="nearest", method="mse", mixed_precision=MixedPrecisionOptions(
            candidate_bits=(4, 8), candidate_act_bits=(4, 8), target_bops=0.05)))
