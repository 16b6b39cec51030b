"""tools/speed.py against this repository's own HEAD on one digits entry (no kit needed):
both sides run the CLI, export the same bytes, give positive ratios, and the baseline's
temporary worktree is gone afterwards; a revision that is not a commit is a one-line error."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

TOOL = REPO / "tools" / "speed.py"


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def speed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


pytestmark = pytest.mark.skipif(git("rev-parse", "--verify", "--quiet", "HEAD").returncode != 0,
                                reason="needs a git checkout with a commit")


@pytest.mark.slow
def test_head_against_itself_runs_both_sides_with_identical_outputs(tmp_path):
    worktrees = git("worktree", "list", "--porcelain").stdout
    proc = speed("--baseline", "HEAD", "--only", "digits_w4a4_lapq", "--repeats", "1", "--json", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["baseline"] == git("rev-parse", "HEAD").stdout.strip()
    assert [(r["entry"], r["side"]) for r in result["runs"]] == [("digits_w4a4_lapq", "old"), ("digits_w4a4_lapq", "new")]
    assert all(r["nfev"] > 0 and r["stage_seconds"]["lapq"] > 0 for r in result["runs"])
    [row] = result["rows"]
    assert row["outputs"] == "same"
    assert row["wall_seconds"]["ratio"] > 0 and row["cost_ratio"]["ratio"] > 0
    assert all(v > 0 for v in result["geometric_mean_ratio"].values())
    assert git("worktree", "list", "--porcelain").stdout == worktrees


def test_a_revision_that_is_not_a_commit_is_refused():
    proc = speed("--baseline", "no-such-revision-here", "--only", "digits_w8a8_minmax")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --baseline 'no-such-revision-here' is not a commit of the git checkout at {REPO}; pass a commit or branch"]
