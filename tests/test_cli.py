"""`python -m onnx_lapq` end to end: success on the shipped model (lapq's flags and report
included), one clean error line on bad input, warnings for flags the method ignores."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import DIGITS_CALIB, DIGITS_HELDOUT, DIGITS_MODEL, make_model
from conftest import run_cli as cli


def top1(path) -> float:
    data = np.load(DIGITS_HELDOUT)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["label"]))


def test_digits_w8a8_with_report(tmp_path):
    out, report = tmp_path / "digits.qdq.onnx", tmp_path / "report.json"
    proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: 6 weight sites and ") and "(W8A8, minmax)" in proc.stdout  # summary
    assert "ONNX Runtime (CPU) runs 6 of its 6 quantized layers on integer kernels\n" in proc.stdout
    assert "calibrate" in proc.stderr and "256" in proc.stderr  # progress
    assert sorted(os.listdir(tmp_path)) == ["digits.qdq.onnx", "report.json"]

    rep = json.loads(report.read_text())
    for field in ("config", "opset", "calibration_samples", "sites", "size_bytes", "seconds", "activations", "weights"):
        assert field in rep, field
    assert rep["calibration_samples"] == len(np.load(DIGITS_CALIB)["input"])
    assert rep["config"]["weight_bits"] == 8 and rep["config"]["act_bits"] == 8
    assert rep["sites"]["activation_sites"] == len(rep["activations"])
    assert rep["sites"]["weight_sites"] == len(rep["weights"]) == sum(n.op_type in ("Conv", "Gemm") for n in onnx.load(str(DIGITS_MODEL)).graph.node)
    assert rep["size_bytes"]["quantized"] < rep["size_bytes"]["float"] / 2
    for a in rep["activations"]:
        lo, hi = a["range"]
        assert lo <= 0 <= hi and a["scale"] > 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)

    float_acc, quant_acc = top1(DIGITS_MODEL), top1(out)
    assert float_acc > 0.9
    assert abs(quant_acc - float_acc) <= 0.01


@pytest.mark.slow
def test_digits_w4a4_keep_first_last(tmp_path):
    out = tmp_path / "digits.w4.onnx"
    proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--weight-bits", "4", "--act-bits", "4", "--keep-first-last-8bit", "--method", "mse")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    types = {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}
    assert TensorProto.INT4 in types and TensorProto.INT8 in types
    assert top1(out) > 0.8
    assert "run dequantized, in float (CPU kernels take 8-bit grids only)" in proc.stdout
    assert "6 weight sites and 5 activation sites (W4A4, first and last layers 8-bit, adaround weights, mse clipping)" in proc.stdout


# --------------------------------------------------------------------------- bad input


def _digits_npz(path, **overrides):
    data = {"input": np.load(DIGITS_CALIB)["input"][:40]}
    data.update(overrides)
    for k in [k for k, v in data.items() if v is None]:
        del data[k]
    np.savez(path, **data)
    return path


def _calib_folder(path, **bad):
    """A folder of two npz files, the second one with ``bad`` arrays."""
    path.mkdir()
    _digits_npz(path / "a.npz")
    _digits_npz(path / "b.npz", **bad)
    return path


def _save(model, path):
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
    return path


def _text_file(path, text="this is not a model\n"):
    path.write_text(text)
    return path


def _opset99_model():
    node = helper.make_node("Relu", ["input"], ["y"])
    return make_model([node], [("input", TensorProto.FLOAT, ["N", 1, 8, 8])], [("y", TensorProto.FLOAT, ["N", 1, 8, 8])], opset=99, check=False)


def _custom_domain_model():
    node = helper.make_node("Magic", ["input"], ["y"], domain="com.example")
    return make_model([node], [("input", TensorProto.FLOAT, ["N", 1, 8, 8])], [("y", TensorProto.FLOAT, ["N", 1, 8, 8])],
                      opset=None, extra_opsets=[("com.example", 1)], check=False)


def _nothing_model():
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"), helper.make_node("Add", ["r", "input"], ["y"], name="add")]
    return make_model(nodes, [("input", TensorProto.FLOAT, ["N", 1, 8, 8])], [("y", TensorProto.FLOAT, ["N", 1, 8, 8])])


def _nan():
    x = np.load(DIGITS_CALIB)["input"][:40].copy()
    x[3, 0, 2, 2] = np.nan
    return x


def _inf():
    x = np.load(DIGITS_CALIB)["input"][:40].copy()
    x[7, 0, 0, 0] = -np.inf
    return x


BAD_CASES = {
    # name: (builder(tmp) -> (IN, CALIB, extra args), expected fragment of the message)
    "not-onnx": (lambda t: (_text_file(t / "text.onnx"), _digits_npz(t / "c.npz"), []), "not a readable ONNX"),
    "missing-model": (lambda t: (t / "absent.onnx", _digits_npz(t / "c.npz"), []), "does not exist"),
    "missing-calib": (lambda t: (DIGITS_MODEL, t / "absent.npz", []), "does not exist"),
    "calib-names": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=None, image=np.zeros((4, 1, 8, 8), np.float32)), []), "input"),
    "calib-dtype": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=np.zeros((4, 1, 8, 8), np.float64)), []), "float64"),
    "calib-shape": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=np.zeros((4, 1, 7, 7), np.float32)), []), "shape"),
    "calib-rank": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=np.zeros((4, 64), np.float32)), []), "shape"),
    "calib-nan": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=_nan()), []), "NaN"),
    "calib-inf": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=_inf()), []), "NaN or Inf"),
    "calib-empty": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", input=np.zeros((0, 1, 8, 8), np.float32)), []), "empty"),
    "calib-extra-array": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz", label=np.zeros(40, np.int64)), []), "['label'] that are no model input"),
    "calib-folder-names-the-file": (lambda t: (DIGITS_MODEL, _calib_folder(t / "cal[1]", input=np.zeros((4, 1, 8, 8), np.float64)), []), "b.npz' is float64"),
    "calib-not-npz": (lambda t: (DIGITS_MODEL, _text_file(t / "c.npz"), []), "npz"),
    "opset-99": (lambda t: (_save(_opset99_model(), t / "m.onnx"), _digits_npz(t / "c.npz"), []), "opset 99"),
    "custom-domain-only": (lambda t: (_save(_custom_domain_model(), t / "m.onnx"), _digits_npz(t / "c.npz"), []), "opset"),
    "nothing-to-quantize": (lambda t: (_save(_nothing_model(), t / "m.onnx"), _digits_npz(t / "c.npz"), []), "nothing to quantize"),
    "weight-bits-9": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz"), ["--weight-bits", "9"]), "--weight-bits 9 is not supported"),
    "weight-bits-1": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz"), ["--weight-bits", "1"]), "--weight-bits 1"),
    "act-bits-32": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz"), ["--act-bits", "32"]), "--act-bits 32"),
    "bad-exclude-regex": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz"), ["--exclude", "conv("]), "regular expression"),
    "max-evals-0": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz"), ["--max-evals", "0", "--method", "lapq"]), "--max-evals 0 must be at least 1"),
    "num-samples-0": (lambda t: (DIGITS_MODEL, _digits_npz(t / "c.npz"), ["--num-samples", "0"]), "--num-samples 0 must be at least 1 (or leave it out for all)"),
}


def assert_one_error_line(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnx_lapq: error: "), lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.slow
def test_bad_input_one_line_exit_2(tmp_path, case):
    build, fragment = BAD_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    model, calib, extra = build(work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = cli(model, out_dir / "out.onnx", "--calib", calib, *extra)
    assert_one_error_line(proc, fragment)
    assert os.listdir(out_dir) == []  # no output, not even a temporary file
    assert proc.stdout == ""


@pytest.mark.parametrize("spelling", ["same", "dot-relative"])
@pytest.mark.slow
def test_output_equal_to_input(tmp_path, spelling):
    model = tmp_path / "model.onnx"
    shutil.copy(DIGITS_MODEL, model)
    before = model.read_bytes()
    out = model if spelling == "same" else tmp_path / "." / "model.onnx"
    proc = cli(model, out, "--calib", DIGITS_CALIB)
    assert_one_error_line(proc, "is the input model")
    assert model.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


OUTPUT_CLASHES = {
    # name: (OUT, --report or None, expected fragment), paths relative to a folder holding m.onnx, c.npz, calib/, out/
    "report-is-input": ("out/q.onnx", "m.onnx", "is the input model"),
    "report-is-output": ("out/q.onnx", "out/q.onnx", "is OUT.onnx"),
    "output-is-calib": ("c.npz", None, "is the calibration file"),
    "report-is-calib": ("out/q.onnx", "c.npz", "is the calibration file"),
    "output-is-file-of-calib-folder": ("cal[1]/a.npz", None, "is the calibration file"),
    "output-is-folder": ("out", None, "is a folder"),
    "report-is-folder": ("out/q.onnx", "out", "is a folder"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CLASHES))
@pytest.mark.slow
def test_outputs_never_replace_inputs_or_each_other(tmp_path, case):
    """OUT and --report are checked against the input model, every calibration file and
    each other, and against being folders, before any work: inputs stay as they were."""
    out, report, fragment = OUTPUT_CLASHES[case]
    shutil.copy(DIGITS_MODEL, tmp_path / "m.onnx")
    shutil.copy(DIGITS_CALIB, tmp_path / "c.npz")
    (tmp_path / "cal[1]").mkdir()  # a folder name that is also a glob pattern
    shutil.copy(DIGITS_CALIB, tmp_path / "cal[1]" / "a.npz")
    (tmp_path / "out").mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calib = tmp_path / ("cal[1]" if case == "output-is-file-of-calib-folder" else "c.npz")
    proc = cli(tmp_path / "m.onnx", tmp_path / out, "--calib", calib, *(["--report", tmp_path / report] if report else []))
    assert_one_error_line(proc, fragment)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("target", ["output", "report"])
@pytest.mark.slow
def test_missing_output_folder_fails_before_the_work(tmp_path, target):
    """A folder that is not there is reported before calibration starts, not after it."""
    absent = tmp_path / "absent"
    out = absent / "out.onnx" if target == "output" else tmp_path / "out.onnx"
    extra = ["--report", absent / "r.json"] if target == "report" else []
    proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, *extra)
    assert_one_error_line(proc, "does not exist: create it first")  # one line: no progress bar ran
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_verbose_allows_traceback(tmp_path):
    proc = cli(tmp_path / "absent.onnx", tmp_path / "out.onnx", "--calib", DIGITS_CALIB, "-v")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("onnx_lapq: error: ")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_search_samples_subset_follows_the_seed(tmp_path):
    """--search-samples draws the search's subset with --seed: another seed, another subset
    (another start loss); the same seed, the same bytes."""
    def lapq(seed: int, name: str):
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--weight-bits", "4", "--act-bits", "4", "--method", "lapq",
                   "--max-evals", "8", "--search-samples", "32", "--seed", seed, "--report", report)
        assert proc.returncode == 0, proc.stderr
        return out.read_bytes(), json.loads(report.read_text())["init_loss"]

    first, again, other = lapq(0, "a"), lapq(0, "b"), lapq(1, "c")
    assert first == again
    assert first[1] != other[1]


@pytest.mark.slow
def test_search_flags_without_lapq_are_warned_about(tmp_path):
    proc = cli(DIGITS_MODEL, tmp_path / "out.onnx", "--calib", DIGITS_CALIB, "--max-evals", "5", "--loss", "mse")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING onnx_lapq: --max-evals, --loss only tune the lapq search: --method minmax ignores them" in proc.stderr
    quiet = cli(DIGITS_MODEL, tmp_path / "out2.onnx", "--calib", DIGITS_CALIB, "--max-evals", "5", "--method", "lapq")
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr, quiet.stderr


@pytest.mark.slow
def test_cli_lapq_writes_report(tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, "--method", "lapq", "--weight-bits", "3", "--act-bits", "3",
               "--max-evals", "40", "--search", "coordinate", "--search-bias-correction", "on", "--search-step", "0.05", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["nfev"] == 40 and "searched" in proc.stdout and data["bias_correction"] is True
    steps = [np.log(a["scale"] / a["initial_scale"]) / 0.05 for a in data["activations"]]  # the searched clips lie on the lattice
    assert data["config"]["lapq"]["search_step"] == 0.05 and np.allclose(steps, np.round(steps), atol=1e-3) and np.any(np.round(steps) != 0)
    onnx.checker.check_model(onnx.load(out))

