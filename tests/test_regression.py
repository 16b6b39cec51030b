"""tools/regression.py in check mode on the digits CNN entries (no kit needed): the CLI's
exported models and search losses equal the recorded ones, and a recorded hash that
differs is reported and fails the check."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

TOOL = REPO / "tools" / "regression.py"
RECORD = REPO / "tools" / "regression.json"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def statuses(stdout: str) -> dict[str, str]:
    """Entry name -> status, from the check's table."""
    return {m[1]: m[2] for m in re.finditer(r"^(\S+)\s+(same|different|args changed|not recorded|error|skipped)\b", stdout, re.M)}


@pytest.mark.slow
def test_digits_entries_export_the_recorded_models():
    digits = [n for n in json.loads(RECORD.read_text())["entries"] if n.startswith("digits_")]
    assert len(digits) == 8
    proc = check("--only", "digits")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(proc.stdout) == {n: "same" for n in digits}


def test_a_changed_hash_is_reported_and_fails(tmp_path):
    record = json.loads(RECORD.read_text())
    entry = record["entries"]["digits_w8a8_minmax"]
    entry["sha256"] = entry["sha256"][::-1]
    altered = tmp_path / "regression.json"
    altered.write_text(json.dumps(record))
    proc = check("--only", "digits_w8a8_minmax", "--json", str(altered))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert statuses(proc.stdout) == {"digits_w8a8_minmax": "different"}
    assert f"recorded {entry['sha256'][:12]}" in proc.stdout


def test_entries_without_kit_files_are_skipped(tmp_path):
    proc = check("--kit", str(tmp_path / "no_kit"), "--only", "cifar10_resnet20", "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(proc.stdout) == {"cifar10_resnet20_w8a8_minmax": "skipped", "cifar10_resnet20_w4a4_lapq": "skipped"}
