"""The progress bar (onnx_lapq.progress): counts, ETA and best loss, lines at an interval on a
log stream and in place on a terminal, a steady line while a stage runs without events, and
the stages that had none (lapq's start, export, fidelity) named."""
from __future__ import annotations

import io
import re
import time

import numpy as np
import onnx
from conftest import DIGITS_CALIB, DIGITS_MODEL, run_cli

import onnx_lapq
from onnx_lapq.progress import Progress
from onnx_lapq.progress import ProgressBar
from onnx_lapq import LapqOptions


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_heartbeat_names_a_stage_without_counts_when_no_line_came_for_an_interval():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(stream, interval=10.0, clock=clock)
    bar(Progress("export", 0, None))
    clock.now += 9
    bar.beat()
    assert stream.getvalue() == ""  # not yet an interval
    clock.now += 2
    bar.beat()
    bar.beat()  # a line was just printed: nothing more
    assert stream.getvalue().splitlines() == ["export     still working, 11s"]
    clock.now += 10
    bar.beat()
    assert stream.getvalue().splitlines()[-1] == "export     still working, 21s"
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "export     finished, 21s"


def test_heartbeat_of_a_counted_stage_shows_counts_elapsed_eta_and_loss():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(stream, interval=10.0, clock=clock)
    bar(Progress("search", 0, 200))
    clock.now += 10
    bar(Progress("search", 50, 200, 0.125))  # the event prints: 10 s passed
    clock.now += 20  # then the search evaluates one slow loss: no event for 20 s
    bar.beat()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"search +\[#+ *\] 50/200 in 30s, ETA 90s, best loss 0\.125", lines[1]), lines[1]
    bar.close(finished=False)


def test_heartbeat_thread_prints_between_events_and_nothing_after_close():
    stream = io.StringIO()
    bar = ProgressBar(stream, interval=0.05)
    bar(Progress("fidelity", 0, None))
    deadline = time.monotonic() + 30
    while "still working" not in stream.getvalue():
        assert time.monotonic() < deadline, "no heartbeat line"
        time.sleep(0.01)
    bar.close(finished=False)  # an error stops the run: it must come after the last line
    written = stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue() == written
    assert all(line.startswith("fidelity   still working, ") for line in written.splitlines())


def test_terminal_gets_no_heartbeat_lines():
    stream = Terminal()
    bar = ProgressBar(stream, interval=0.0)
    bar(Progress("export", 0, None))
    time.sleep(0.1)
    bar.beat()
    assert stream.getvalue().count("\r") == 1 and "\n" not in stream.getvalue()
    bar.close()


def test_stages_without_counts_send_an_event_as_they_begin():
    model, calib = onnx.load(DIGITS_MODEL), [{"input": np.load(DIGITS_CALIB)["input"][:32]}]
    stages = []

    def record(progress: Progress) -> None:
        if not stages or stages[-1] != progress.stage:
            stages.append(progress.stage)

    onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(method="lapq", lapq=LapqOptions(max_evals=2)), on_step=record)
    assert stages == ["calibrate", "start", "search", "export", "fidelity"]
    stages.clear()
    onnx_lapq.quantize(model, None, config=onnx_lapq.QuantConfig(weight_only=True, weight_bits=4), on_step=record)
    assert stages == ["export"]  # no calibration data: no fidelity to measure


def test_cli_weight_only_log_names_its_stages(tmp_path):
    proc = run_cli(DIGITS_MODEL, tmp_path / "q.onnx", "--weight-only", "--weight-bits", "4", "--calib", DIGITS_CALIB)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "WARNING" not in line]
    assert [line.split()[0] for line in lines] == ["export", "fidelity"], proc.stderr
    assert all(re.search(r" finished, \d+s$", line) for line in lines), proc.stderr


def test_a_with_block_stops_the_heartbeat():
    stream = io.StringIO()
    with ProgressBar(stream, interval=0.05) as bar:
        bar(Progress("export", 0, None))
    written = stream.getvalue()
    assert written.startswith("export     finished, ")
    time.sleep(0.2)
    assert stream.getvalue() == written and not bar._heartbeat.is_alive()


def test_progress_bar_shows_count_eta_and_loss():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for n in range(1, 11):
        bar(Progress("search", n, 10, 1.0 / n))
    bar.close()
    line = stream.getvalue().strip()
    assert line.startswith("search") and "10/10" in line and "ETA" in line and "loss 0.1" in line


def test_progress_lines_at_an_interval_on_a_log_stream():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(stream, interval=10.0, clock=clock)
    for n in range(1, 101):
        clock.now += 0.5  # 50 s in all: a line every 10 s
        bar(Progress("search", n, 200, 1.0 / n))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("search") and " 21/200 " in lines[0] and "best loss 0.04762" in lines[0]
    assert re.search(r"ETA +85s", lines[0]), lines[0]  # 20 more of 200 in 10 s
    assert " 41/200 " in lines[1] and " 81/200 " in lines[3]
    bar.close()
    assert " 100/200 " in stream.getvalue().splitlines()[-1]


def test_progress_bar_on_a_terminal_draws_in_place():
    stream, clock = Terminal(), Clock()
    bar = ProgressBar(stream, interval=0.0, clock=clock)
    for n in range(1, 4):
        clock.now += 20
        bar(Progress("calibrate", n * 32, None))
    assert stream.getvalue().count("\r") == 3 and "\n" not in stream.getvalue()
