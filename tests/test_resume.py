"""A lapq run interrupted and resumed from its search journal ends with the same bytes as one
never stopped (the shipped digits CNN at W4A4); a journal of another run, or a damaged
checkpoint file, is refused with one line."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from conftest import DIGITS_CALIB, DIGITS_MODEL, REPO
from conftest import run_cli as cli
import onnx_lapq
from onnx_lapq import CheckpointError, ConfigError, QuantConfig, SearchJournal, quantize
from onnx_lapq.__main__ import main
from onnx_lapq import LapqOptions

MAX_EVALS = 60
# rounded to nearest, so that the search races bias correction (a reconstruction leaves nothing to correct)
CONFIG = QuantConfig(weight_bits=4, act_bits=4, method="lapq", weights="nearest", lapq=LapqOptions(max_evals=MAX_EVALS))
LAPQ_W4A4 = ["--weight-bits", "4", "--act-bits", "4", "--method", "lapq", "--weights", "nearest", "--max-evals", MAX_EVALS]
SEARCH_FIELDS = ("p_losses", "start_losses", "init_loss", "final_loss", "nfev", "nit", "loss_trace", "exported_loss", "bias_correction")


class _Stop(Exception):
    pass


def _stop(progress) -> None:
    raise _Stop


def _stop_after(evaluations: int):
    """An on_step that interrupts the run once the search has made ``evaluations``."""
    def on_step(progress) -> None:
        if progress.stage == "search" and progress.done >= evaluations:
            raise _Stop
    return on_step


def _digits():
    return onnx.load(str(DIGITS_MODEL)), [dict(np.load(DIGITS_CALIB))]


@pytest.fixture(scope="module")
def uninterrupted():
    model, calibration = _digits()
    return quantize(model, calibration, config=CONFIG)


@pytest.fixture(scope="module")
def interrupted_journal():
    """The journal of a run stopped after 25 search evaluations."""
    model, calibration = _digits()
    journal = SearchJournal()
    with pytest.raises(_Stop):
        quantize(model, calibration, config=CONFIG, on_step=_stop_after(25), journal=journal)
    return journal


def test_api_resume_gives_the_uninterrupted_bytes(uninterrupted, interrupted_journal):
    recorded = len(interrupted_journal.entries)
    journal = SearchJournal.from_text(interrupted_journal.to_text())
    model, calibration = _digits()
    resumed = quantize(model, calibration, config=CONFIG, journal=journal)
    assert resumed.model.SerializeToString() == uninterrupted.model.SerializeToString()
    for field in SEARCH_FIELDS:
        assert resumed.report[field] == uninterrupted.report[field], field
    race = {k: v for k, v in uninterrupted.report["bias_correction_race"].items() if k != "seconds"}
    assert race.items() <= resumed.report["bias_correction_race"].items()
    assert resumed.report["nfev"] == MAX_EVALS
    assert 25 < recorded < len(journal.entries)  # the search had begun, and the resumed run measured the rest
    assert resumed.report["replayed_evaluations"] == recorded


def _with_one_weight_changed(model: onnx.ModelProto) -> onnx.ModelProto:
    changed = onnx.ModelProto.FromString(model.SerializeToString())
    weight = changed.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    return changed


def test_journal_of_another_run_is_refused(interrupted_journal):
    model, calibration = _digits()
    other = {**calibration[0], "input": calibration[0]["input"][::-1].copy()}
    for kwargs, words in (
        ({"model": _with_one_weight_changed(model)}, "it was made from another model"),
        ({"calibration": [other]}, "it was made from other calibration data"),
        ({"config": dataclasses.replace(CONFIG, lapq=LapqOptions(max_evals=80))}, "it was made with max_evals=60, this run has max_evals=80"),
    ):
        journal = SearchJournal.from_text(interrupted_journal.to_text())
        args = {"model": model, "calibration": calibration, "config": CONFIG, **kwargs}
        with pytest.raises(CheckpointError, match=f"^the checkpoint belongs to another run: {words}; "):
            quantize(args["model"], args["calibration"], config=args["config"], journal=journal)


def test_journal_of_another_onnxruntime_is_refused(interrupted_journal):
    journal = SearchJournal.from_text(interrupted_journal.to_text())
    journal.binding["versions"]["onnxruntime"] = "1.0.0"
    model, calibration = _digits()
    with pytest.raises(CheckpointError, match=f"it was written by onnx_lapq {onnx_lapq.__version__} with onnxruntime 1.0.0, "
                                              f"this is onnx_lapq {onnx_lapq.__version__} with onnxruntime {onnxruntime.__version__}"):
        quantize(model, calibration, config=CONFIG, journal=journal)


def test_numpy_config_values_bind_as_the_python_numbers(interrupted_journal):
    journal = SearchJournal.from_text(interrupted_journal.to_text())
    model, calibration = _digits()
    config = QuantConfig(weight_bits=np.int64(4), act_bits=4, method="lapq", weights="nearest", lapq=LapqOptions(max_evals=np.int32(MAX_EVALS)))
    with pytest.raises(_Stop):  # the journal is bound before calibration starts
        quantize(model, calibration, config=config, journal=journal, on_step=_stop)


def test_replay_that_meets_another_point_is_refused(interrupted_journal):
    journal = SearchJournal.from_text(interrupted_journal.to_text())
    digest, loss = journal.entries[10]
    journal.entries[10] = ("0" * len(digest), loss)  # as if the code that chose the 11th point had changed
    model, calibration = _digits()
    with pytest.raises(CheckpointError, match="evaluation 11 of this run is not the checkpoint's"):
        quantize(model, calibration, config=CONFIG, journal=journal)


def test_journal_refuses_a_time_limit_and_other_methods():
    model, calibration = _digits()
    with pytest.raises(ConfigError, match="time_limit=5.0 makes the search depend on the machine's speed"):
        quantize(model, calibration, config=QuantConfig(method="lapq", lapq=LapqOptions(time_limit=5.0)), journal=SearchJournal())
    with pytest.raises(ConfigError, match="method='minmax' makes none"):
        quantize(model, calibration, config=QuantConfig(), journal=SearchJournal())


def test_journal_text_keeps_exact_losses():
    journal = SearchJournal(entries=[("ab" * 12, 0.1 + 0.2), ("cd" * 12, float("inf"))], binding={"model": "x"})
    assert SearchJournal.from_text(journal.to_text()).entries == journal.entries


# --------------------------------------------------------------------------- command line


def _popen(*args) -> subprocess.Popen:
    """The CLI in a subprocess that takes Ctrl-C as a terminal's does, even where this test runs
    in the background (a shell starts background jobs with SIGINT ignored, and Python keeps it so)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "onnx_lapq", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _entries(checkpoint) -> int:
    return len(json.loads(checkpoint.read_text())["entries"]) if checkpoint.exists() else 0


def _wait_for(checkpoint, entries: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the run's checkpoint holds ``entries`` evaluations; how many it holds."""
    deadline = time.monotonic() + timeout
    while _entries(checkpoint) < entries:
        assert proc.poll() is None, f"the run ended before {checkpoint} held {entries} evaluations: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{checkpoint} held less than {entries} evaluations after {timeout} s"
        time.sleep(0.01)
    return _entries(checkpoint)


@pytest.fixture(scope="module")
def uninterrupted_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "digits.w4a4.onnx"
    proc = cli(DIGITS_MODEL, out, "--calib", DIGITS_CALIB, *LAPQ_W4A4)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow), pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_cli_killed_then_resumed_writes_the_uninterrupted_bytes(tmp_path, uninterrupted_cli, sig):
    out, checkpoint = tmp_path / "digits.w4a4.onnx", tmp_path / "search.ckpt"
    command = [DIGITS_MODEL, out, "--calib", DIGITS_CALIB, *LAPQ_W4A4, "--checkpoint", checkpoint, "--checkpoint-every", 7]
    proc = _popen(*command)
    seen = _wait_for(checkpoint, 56, proc)  # of 77: the race is over (47), the search goes on
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143, signal.SIGINT: 130}[sig], stderr
    assert not out.exists()
    entries = _entries(checkpoint)
    if sig == signal.SIGKILL:
        assert entries % 7 == 0  # only the periodic writes happened
    assert entries >= seen

    resumed = cli(*command, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == uninterrupted_cli
    assert f"resumed from {checkpoint}: {entries} evaluations replayed" in resumed.stdout
    assert not checkpoint.exists()  # spent once OUT is written


def _error_of(capsys, *args) -> str:
    """The CLI's stderr for ARGS, run in this process, which must end with exit status 2."""
    assert main(list(map(str, args))) == 2
    return capsys.readouterr().err


def _checkpoint_file(journal: SearchJournal, path):
    path.write_text(journal.to_text())
    return path


def _reversed_calibration(path):
    np.savez(path, input=np.load(DIGITS_CALIB)["input"][::-1])
    return path


@pytest.mark.parametrize("change, words", [
    (lambda t: ["--calib", DIGITS_CALIB, "--seed", 1], "it was made with --seed 0, this run has --seed 1"),
    (lambda t: ["--calib", _reversed_calibration(t / "calib" / "reversed.npz")], "it was made from other calibration data"),
])
def test_cli_resume_of_another_run_is_refused(tmp_path, capsys, interrupted_journal, change, words):
    (tmp_path / "calib").mkdir()
    checkpoint = _checkpoint_file(interrupted_journal, tmp_path / "search.ckpt")
    before = checkpoint.read_bytes()
    stderr = _error_of(capsys, DIGITS_MODEL, tmp_path / "out.onnx", *change(tmp_path), *LAPQ_W4A4, "--checkpoint", checkpoint, "--resume")
    assert stderr.splitlines() == [
        f"onnx_lapq: error: the checkpoint belongs to another run: {words}; resume with what it was made from, or start over without resuming"
    ]
    assert checkpoint.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["calib", "search.ckpt"]


@pytest.mark.parametrize("damage", ["truncated", "binary", "empty", "other-json"])
def test_cli_damaged_checkpoint_is_refused(tmp_path, capsys, interrupted_journal, damage):
    checkpoint = tmp_path / "search.ckpt"
    text = interrupted_journal.to_text().encode()
    checkpoint.write_bytes({
        "truncated": text[:len(text) // 2], "binary": bytes(range(256)), "empty": b"", "other-json": b'{"entries": []}',
    }[damage])
    stderr = _error_of(capsys, DIGITS_MODEL, tmp_path / "out.onnx", "--calib", DIGITS_CALIB, *LAPQ_W4A4, "--checkpoint", checkpoint, "--resume")
    assert stderr.splitlines() == [
        f"onnx_lapq: error: --checkpoint {str(checkpoint)!r} is not a readable onnx_lapq checkpoint (damaged, truncated or another file): "
        "delete it and start over without resuming"
    ]
    assert sorted(os.listdir(tmp_path)) == ["search.ckpt"]


@pytest.mark.parametrize("flags, words", [
    (["--resume"], "--resume continues the run kept in a checkpoint: give its path with --checkpoint PATH"),
    (["--resume", "--checkpoint", "absent.ckpt"], "there is no checkpoint at"),
    (["--checkpoint", "x.ckpt", "--checkpoint-every", 0], "--checkpoint-every 0 must be at least 1"),
    (["--checkpoint", "x.ckpt", "--time-limit", 5], "--time-limit 5.0 makes the search depend on the machine's speed"),
])
def test_cli_checkpoint_flag_errors(tmp_path, capsys, flags, words):
    flags = [tmp_path / f if isinstance(f, str) and f.endswith(".ckpt") else f for f in flags]
    stderr = _error_of(capsys, DIGITS_MODEL, tmp_path / "out.onnx", "--calib", DIGITS_CALIB, *LAPQ_W4A4, *flags)
    assert words in stderr and stderr.count("\n") == 1, stderr
    assert os.listdir(tmp_path) == []


def test_cli_checkpoint_never_replaces_a_file_that_is_no_checkpoint(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    stderr = _error_of(capsys, DIGITS_MODEL, tmp_path / "out.onnx", "--calib", DIGITS_CALIB, *LAPQ_W4A4, "--checkpoint", notes)
    assert "exists and is not an onnx_lapq checkpoint: choose another path" in stderr and stderr.count("\n") == 1, stderr
    assert notes.read_text() == "my notes\n"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
