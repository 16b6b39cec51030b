"""The README tells the truth: its Python API example and its calibration-file example run
verbatim against the shipped model, and its flag table lists every CLI flag with its default."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import onnx
import pytest

from conftest import DIGITS_MODEL, REPO
from onnx_lapq.__main__ import build_parser
from onnx_lapq.data import input_specs, iter_batches, npz_batches


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path):
    """The README's Python API block, verbatim, beside a link to models/: it writes a model
    whose exported loss is the search's."""
    readme = (REPO / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "models").symlink_to(REPO / "models")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    final, exported = map(float, proc.stdout.split())
    assert exported == pytest.approx(final, rel=0.01)
    onnx.checker.check_model(onnx.load(str(tmp_path / "digits_cnn.w4a4.onnx")), full_check=True)


def test_readme_lists_every_flag_with_its_default():
    """The README's flag table and --help: the same flags, the same defaults."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        found = re.match(r"\| `(--[\w-]+)[^`]*`[^|]* \| ([^|]+) \|", line)
        if found:
            rows[found.group(1)] = found.group(2).strip()
    expected = {}
    for action in build_parser()._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or not action.option_strings:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            default = "off"
        else:
            default = "–" if action.default in (None, []) else f"`{action.default}`"
        expected[action.option_strings[-1]] = default
    assert rows == expected


def test_readme_calibration_file_example_fits_the_model(tmp_path, monkeypatch, capsys):
    """The README's calibration-file block, verbatim, beside a link to models/: it prints the
    input as its comment says and writes an .npz that the model's calibration accepts."""
    readme = (REPO / "README.md").read_text()
    code = readme.split("## Your own model: the calibration file", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "models").symlink_to(REPO / "models")
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    printed = re.search(r"^# (input .*)$", code, re.M).group(1)
    assert capsys.readouterr().out == printed + "\n"
    specs = input_specs(onnx.load(str(DIGITS_MODEL)))
    batches = list(iter_batches(npz_batches(str(tmp_path / "calib.npz")), specs, batch_size=100))
    assert [len(b["input"]) for b in batches] == [100, 100, 100]
