#!/usr/bin/env python3
"""Speed check: the regression matrix's CLI runs timed side by side against an older commit.

    python tools/speed.py --baseline REV [--kit ../shared/kit] [--only NAME_PART]
        [--repeats N] [--json PATH] [--cache DIR]

REV is checked out into a temporary detached git worktree (removed at the end, also on
Ctrl-C or SIGTERM). Each entry of tools/regression.py's MATRIX runs `python -m onnx_lapq`
of the baseline checkout, then of this one, alternating (old, new, old, new, ...) ``--repeats``
times, so that the load of a shared machine weighs on both sides alike. Both sides run on
the same interpreter and read the same input files (this checkout's models/, the kit, one
calibration cache); PYTHONPATH and the working folder make each import its own onnx_lapq,
which is checked before the first run.

Per run it records the process's wall seconds, the report's stage seconds, and where a
search ran its evaluator's cost_ratio (seconds of one evaluation over one FP32 pass,
measured inside the run, so mostly free of the machine's load) and nfev; and the SHA-256
of the exported model. One row per entry: median wall seconds old and new and their ratio
(new / old), median cost_ratio old and new and their ratio, and `same` when every run of
both sides exported the same bytes (`DIFFERENT` otherwise). The last line is the geometric
mean of each ratio column. --json writes every run and row. Exit status 1 when an entry's
outputs differ or a run failed; entries whose kit files are missing are skipped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench and regression, beside this file

from bench import REPO, write_json  # noqa: E402
from regression import MATRIX, Entry, cli_args, kit_inputs, lapq_commit, real_args  # noqa: E402


class SpeedError(Exception):
    """A condition the tool cannot run under; its message says what to do."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the older commit to compare with (any git revision)")
    ap.add_argument("--kit", type=Path, default=Path(os.environ.get("ONNX_LAPQ_KIT", REPO.parent / "shared" / "kit")))
    ap.add_argument("--only", help="run the entries whose name contains this text")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side per entry (default 3)")
    ap.add_argument("--json", type=Path, help="write every run and row here")
    ap.add_argument("--cache", type=Path, help="folder for the kit models' calibration npz (default: a temporary folder)")
    a = ap.parse_args(argv)
    a.kit = a.kit.resolve()
    a.entries = [e for e in MATRIX if not a.only or a.only in e.name]
    if not a.entries:
        ap.error(f"--only {a.only!r} matches no entry; the entries are: {', '.join(e.name for e in MATRIX)}")
    if a.repeats < 1:
        ap.error("--repeats must be 1 or more")
    return a


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


@contextmanager
def baseline_checkout(rev: str):
    """(full commit, folder) of ``rev`` checked out in a temporary detached worktree, removed on exit."""
    commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").stdout.strip()
    if not commit:
        raise SpeedError(f"--baseline {rev!r} is not a commit of the git checkout at {REPO}; pass a commit or branch")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` removes the worktree
    try:
        with tempfile.TemporaryDirectory(prefix="onnx_lapq_speed_") as tmp:
            folder = Path(tmp) / "baseline"
            added = git("worktree", "add", "--detach", str(folder), commit)
            if added.returncode:
                raise SpeedError(f"git worktree add failed: {added.stderr.strip()}")
            try:
                yield commit, folder
            finally:
                git("worktree", "remove", "--force", str(folder))
                git("worktree", "prune")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def side_env(checkout: Path) -> dict[str, str]:
    """The environment that makes ``python -m onnx_lapq`` run in ``checkout`` import that
    checkout's package (checked here, since an installed copy would otherwise go unnoticed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import onnx_lapq; print(onnx_lapq.__file__)"],
                           cwd=checkout, env=env, capture_output=True, text=True)
    where = Path(probe.stdout.strip() or "?").resolve()
    if checkout.resolve() not in where.parents:
        raise SpeedError(f"python in {checkout} imports onnx_lapq from {where} ({probe.stderr.strip()[-200:]}); "
                         "uninstall any non-editable onnx_lapq from this interpreter")
    return env


def search_figures(report: dict) -> dict:
    """Stage seconds, and the evaluator's cost_ratio and nfev where a search ran, from a
    report that keeps the search's fields at top level or under "search"."""
    search = report.get("search", report)
    figures = {"stage_seconds": report["seconds"]}
    if "evaluator" in search:
        figures.update(cost_ratio=search["evaluator"]["cost_ratio"], nfev=search["nfev"])
    return figures


def timed_run(argv: list[str], checkout: Path, env: dict[str, str], out: Path) -> dict:
    """One CLI run of ``checkout`` writing into ``out``: wall seconds, the report's figures and
    the model's SHA-256, or the CLI's last error line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnx_lapq", *argv], cwd=checkout, env=env, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 3)
    if proc.returncode:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()
        return {"wall_seconds": wall, "error": lines[-1]}
    report = json.loads((out / "report.json").read_text())
    sha = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    return {"wall_seconds": wall, **search_figures(report), "sha256": sha}


def run_entry(entry: Entry, args: list[str], sides: dict[str, tuple[Path, dict]], folders: dict[str, Path], repeats: int) -> list[dict]:
    """The entry's runs, the sides alternating ``repeats`` times."""
    runs = []
    for repeat in range(repeats):
        for side, (checkout, env) in sides.items():
            with tempfile.TemporaryDirectory(prefix="onnx_lapq_speed_out_") as out:
                argv = real_args(args, {**folders, "OUT": Path(out)})
                runs.append({"entry": entry.name, "side": side, "repeat": repeat, **timed_run(argv, checkout, env, Path(out))})
    return runs


def summarise(name: str, runs: list[dict]) -> dict:
    """The entry's row: medians per side, their ratios (new / old) and whether the outputs match."""
    row = {"entry": name}
    if any("error" in r for r in runs):
        return {**row, "outputs": "error", "error": next(f"{r['side']}: {r['error']}" for r in runs if "error" in r)}
    for key in ("wall_seconds", "cost_ratio"):
        medians = {s: statistics.median(r[key] for r in runs if r["side"] == s and key in r)
                   for s in ("old", "new") if any(key in r for r in runs if r["side"] == s)}
        if len(medians) == 2:
            row[key] = {**medians, "ratio": round(medians["new"] / medians["old"], 3)}
    row["outputs"] = "same" if len({r["sha256"] for r in runs}) == 1 else "DIFFERENT"
    return row


def table_row(row: dict) -> str:
    def cells(key: str, fmt: str) -> str:
        m = row.get(key)
        return f"{m['old']:{fmt}} {m['new']:{fmt}} {m['ratio']:6.3f}" if m else " " * (2 * int(fmt.split('.')[0]) + 8)

    detail = row.get("error") or row.get("skipped") or ""
    return f"{row['entry']:36} {cells('wall_seconds', '7.1f')}   {cells('cost_ratio', '6.2f')}   {row['outputs']:9} {detail}".rstrip()


def summary_line(rows: list[dict]) -> tuple[str, dict]:
    """The line that ends the table, and the geometric mean of each ratio column (None where no entry has one)."""
    means = {}
    for key in ("wall_seconds", "cost_ratio"):
        ratios = [r[key]["ratio"] for r in rows if key in r]
        means[key] = round(statistics.geometric_mean(ratios), 3) if ratios else None
    text = ", ".join(f"{k} {v:.3f} ({sum(k in r for r in rows)} entries)" for k, v in means.items() if v is not None)
    return f"geometric mean of new / old: {text or 'no entry ran'}", means


def measure(a: argparse.Namespace, cache: Path, commit: str, baseline: Path) -> tuple[list[dict], list[dict]]:
    """(rows, runs) of the selected entries, each row printed as its entry finishes."""
    sides = {"old": (baseline, side_env(baseline)), "new": (REPO, side_env(REPO))}
    folders = {"KIT": a.kit, "CACHE": cache, "models": REPO / "models"}  # the same input files for both sides
    print(f"old: {commit[:12]} ({baseline}); new: {lapq_commit()} ({REPO}); {a.repeats} runs each, alternating")
    print(f"{'':36} {'wall seconds':^22}   {'cost_ratio':^20}")
    print(f"{'entry':36} {'old':>7} {'new':>7} {'ratio':>6}   {'old':>6} {'new':>6} {'ratio':>6}   outputs")
    calib: dict = {}
    rows, runs = [], []
    for entry in a.entries:
        inputs = None if entry.model is None else kit_inputs(a.kit, entry.model, cache, calib)
        if entry.model is not None and inputs is None:
            rows.append({"entry": entry.name, "outputs": "skipped", "skipped": f"{entry.model} is not in the kit at {a.kit}"})
        else:
            ran = run_entry(entry, cli_args(entry, a.kit, inputs), sides, folders, a.repeats)
            runs += ran
            rows.append(summarise(entry.name, ran))
        print(table_row(rows[-1]), flush=True)
    return rows, runs


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    try:
        with baseline_checkout(a.baseline) as (commit, baseline), \
                tempfile.TemporaryDirectory(prefix="onnx_lapq_speed_cache_") as tmp:
            rows, runs = measure(a, (a.cache or Path(tmp)).resolve(), commit, baseline)
    except SpeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the baseline worktree is removed", file=sys.stderr)
        return 130
    text, means = summary_line(rows)
    print(text)
    if a.json:
        write_json(a.json, {"baseline": commit, "new": lapq_commit(), "repeats": a.repeats,
                            "geometric_mean_ratio": means, "rows": rows, "runs": runs})
    return 1 if any(r["outputs"] in ("DIFFERENT", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
