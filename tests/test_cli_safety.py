"""The CLI never loses a file: outputs checked against every input (external data included)
and for replaceability before any work, SIGTERM handled like Ctrl-C, messages that name the
cause and the CLI's flags, and --version."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from conftest import DIGITS_CALIB, DIGITS_MODEL, REPO, run_cli
from onnx_lapq import __version__
from onnx_lapq.__main__ import main


@pytest.fixture
def cli(capsys):
    """``python -m onnx_lapq ARGS`` run in this process (for runs that stop before the work)."""
    def run(*args) -> subprocess.CompletedProcess:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def assert_one_error_line(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx_lapq: error: "), proc.stderr
    assert fragment in lines[0], lines[0]


def files_in(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def external_data_model(folder, location: str):
    """The digits CNN saved as ``folder/m.onnx`` with every weight in ``folder/location``."""
    model = onnx.load(str(DIGITS_MODEL))
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    assert os.path.getsize(folder / location) > 10_000
    return folder / "m.onnx"


# --------------------------------------------------------------------------- outputs vs the input's external data

DATA_CLASHES = {
    # name: (external data location, OUT, --report or None, fragment); paths relative to the model's folder
    "out-is-data-beside": ("m.weights.bin", "m.weights.bin", None, "OUT.onnx"),
    "out-is-data-in-subfolder": ("weights/m.bin", "weights/m.bin", None, "OUT.onnx"),
    "report-is-data-beside": ("m.weights.bin", "q.onnx", "m.weights.bin", "--report"),
    "report-is-data-in-subfolder": ("weights/m.bin", "q.onnx", "weights/m.bin", "--report"),
    "out-data-is-data-beside": ("q.onnx.data", "q.onnx", None, "the external data file of OUT.onnx"),
    "out-data-is-data-in-subfolder": ("weights/q.onnx.data", "weights/q.onnx", None, "the external data file of OUT.onnx"),
}


@pytest.mark.parametrize("case", list(DATA_CLASHES))
def test_outputs_never_replace_the_inputs_external_data(cli, tmp_path, case):
    location, out, report, flag = DATA_CLASHES[case]
    (tmp_path / "weights").mkdir()
    model = external_data_model(tmp_path, location)
    before = files_in(tmp_path)
    proc = cli(model, tmp_path / out, "--calib", DIGITS_CALIB, *(["--report", tmp_path / report] if report else []))
    assert_one_error_line(proc, f"{flag} ")
    assert "is the input model's external data file" in proc.stderr
    assert files_in(tmp_path) == before
    onnx.load(str(model))  # still loads with its weights


@pytest.mark.slow
def test_model_with_external_data_in_a_subfolder_quantizes(tmp_path):
    (tmp_path / "weights").mkdir()
    model = external_data_model(tmp_path, "weights/m.bin")
    proc = run_cli(model, tmp_path / "q.onnx", "--calib", DIGITS_CALIB)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")))


def test_report_is_the_output_model_external_data(cli, tmp_path):
    proc = cli(DIGITS_MODEL, tmp_path / "q.onnx", "--calib", DIGITS_CALIB, "--report", tmp_path / "q.onnx.data")
    assert_one_error_line(proc, "--report")
    assert "is the external data file of OUT.onnx" in proc.stderr and "give each output a path of its own" in proc.stderr
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- bad external data named


def _short(folder):
    model = external_data_model(folder, "m.bin")
    with open(folder / "m.bin", "r+b") as fh:
        fh.truncate(1000)
    return model


def _missing(folder):
    model = external_data_model(folder, "m.bin")
    os.remove(folder / "m.bin")
    return model


def _escaping(folder):
    (folder / "inner").mkdir()
    external_data_model(folder, "m.bin")
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.bin"
    (folder / "inner" / "m.onnx").write_bytes(model.SerializeToString())
    return folder / "inner" / "m.onnx"


BAD_EXTERNAL_DATA = {
    "too-short": (_short, "m.bin' is too short for tensor"),
    "missing": (_missing, "m.bin' of tensor"),
    "escapes-the-folder": (_escaping, "has its external data at '../m.bin', outside the model's folder"),
}


@pytest.mark.parametrize("case", list(BAD_EXTERNAL_DATA))
@pytest.mark.parametrize("verbose", [False, True])
def test_bad_external_data_names_its_cause(cli, tmp_path, case, verbose):
    build, fragment = BAD_EXTERNAL_DATA[case]
    (tmp_path / "in").mkdir()
    model = build(tmp_path / "in")
    proc = cli(model, tmp_path / "q.onnx", "--calib", DIGITS_CALIB, *(["-v"] if verbose else []))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("onnx_lapq: error: ") and fragment in last, last
    assert "not a readable ONNX model" not in proc.stderr
    if not verbose:
        assert_one_error_line(proc, fragment)
    assert not (tmp_path / "q.onnx").exists()


# --------------------------------------------------------------------------- OUT that cannot be replaced


def _immutable(path):
    path.write_bytes(b"old")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    return path


def _fifo(path):
    os.mkfifo(path)
    return path


UNREPLACEABLE = {
    "immutable": (_immutable, "is an existing immutable file"),
    "name-too-long": (lambda path: path.with_name("q" * 300 + ".onnx"), "has a name longer than its file system allows"),
    "fifo": (_fifo, "is not a regular file"),
}


@pytest.mark.parametrize("flag", ["OUT", "--report"])
@pytest.mark.parametrize("case", list(UNREPLACEABLE))
def test_unreplaceable_output_fails_before_the_work(cli, tmp_path, case, flag):
    """Each of these failed only at the final rename, after all the work, as an internal
    error (exit 1), or (a pipe) was replaced by the model."""
    make, fragment = UNREPLACEABLE[case]
    target = make(tmp_path / "target")
    try:
        out, report = (target, []) if flag == "OUT" else (tmp_path / "q.onnx", ["--report", target])
        proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, *report)
        assert_one_error_line(proc, fragment)  # one line: no stage ran
        assert not [p for p in os.listdir(tmp_path) if p not in ("target",)]
    finally:
        if case == "immutable":
            subprocess.run(["chattr", "-i", str(target)], check=True)


# --------------------------------------------------------------------------- SIGTERM

SLOW_WRITE = """
import os, sys, time
import onnx_lapq.__main__ as cli
replace = os.replace
def slow_replace(src, dst):
    if os.path.basename(src).startswith(".onnx_lapq-"):
        time.sleep(60)
    return replace(src, dst)
os.replace = slow_replace
sys.exit(cli.main(sys.argv[1:]))
"""


def _popen(args, code=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, "-m", "onnx_lapq", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _wait_for(condition, proc, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _terminate(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "onnx_lapq: terminated", err
    assert "Traceback" not in err
    return out


@pytest.mark.slow
def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path):
    proc = _popen([DIGITS_MODEL, tmp_path / "q.onnx", "--calib", DIGITS_CALIB, "--report", tmp_path / "r.json"], SLOW_WRITE)
    _wait_for(lambda: any(p.startswith(".onnx_lapq-") and os.path.getsize(tmp_path / p) > 0 for p in os.listdir(tmp_path)), proc)
    assert _terminate(proc) == ""
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sigterm_during_the_search_stops_cleanly(tmp_path):
    proc = _popen([DIGITS_MODEL, tmp_path / "q.onnx", "--calib", DIGITS_CALIB, "--method", "lapq", "--weight-bits", "4",
                   "--act-bits", "4", "--max-evals", "100000"])
    first = proc.stderr.readline()  # the calibration stage's closing line: the run has moved on
    assert first.startswith("calibrate"), first
    _terminate(proc)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- messages


def test_object_dtype_npz_is_told_how_to_fix_it(cli, tmp_path):
    calib = tmp_path / "c.npz"
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 7), np.float32)]
    np.savez(calib, input=ragged)
    proc = cli(DIGITS_MODEL, tmp_path / "q.onnx", "--calib", calib)
    assert_one_error_line(proc, "array 'input' of calibration file")
    assert "has dtype object (ragged samples or Python objects)" in proc.stderr and "np.stack(samples).astype(np.float32)" in proc.stderr
    assert "numpy.savez" not in proc.stderr


FIELD_MESSAGES = {
    # name: (extra args, expected fragment, API field names that must not appear)
    "ce-without-labels": (["--method", "lapq", "--loss", "ce"], "set --labels KEY to the name", ("label_key",)),
    "mask-input-unknown": (["--mask-input", "nosuch"], "--mask-input 'nosuch' is not a graph input", ("mask_input",)),
    "weight-only-lapq": (["--weight-only", "--method", "lapq"], "--weight-only quantizes weights alone", ("weight_only",)),
}


@pytest.mark.parametrize("case", list(FIELD_MESSAGES))
def test_config_errors_name_the_flags(cli, tmp_path, case):
    extra, fragment, fields = FIELD_MESSAGES[case]
    proc = cli(DIGITS_MODEL, tmp_path / "q.onnx", "--calib", DIGITS_CALIB, *extra)
    assert_one_error_line(proc, fragment)
    assert not any(field in proc.stderr for field in fields), proc.stderr


# --------------------------------------------------------------------------- --version


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"onnx_lapq {__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)

