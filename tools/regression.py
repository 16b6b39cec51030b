#!/usr/bin/env python3
"""Regression check: the exported models of a fixed matrix of CLI runs, byte for byte.

    python tools/regression.py --kit ../shared/kit --record   # run the matrix, write tools/regression.json
    python tools/regression.py --kit ../shared/kit            # run it again, compare, exit 1 on any difference
        [--only NAME_PART] [--cache DIR] [--json PATH]

Each entry runs `python -m onnx_lapq IN OUT --calib NPZ ... --report REPORT` in a
subprocess (what users run), writing into a temporary folder. Recorded per entry: its
name, the CLI arguments (KIT, CACHE and OUT stand for the kit, the calibration cache and
the temporary folder), the SHA-256 of OUT, the search's final_loss and exported_loss
where the report has them, the onnx_lapq commit (-dirty when onnx_lapq/ has uncommitted
changes) and the onnxruntime version.

Check mode prints one row per entry: `same` (hash and losses equal), `different`,
`args changed` (the matrix's arguments are not the recorded ones), `not recorded`,
`error` (the CLI failed), or `skipped` (its kit files are missing; not a failure).
Any row but `same` and `skipped` makes the exit status 1. --record with --only
replaces the recorded entries it ran and keeps the others.

Calibration: the digits CNN uses models/digits_cnn_calib.npz; kit models use the
benchmark's calibration batches (benchkit/kitdata.py: 256 samples, seed 0), written
to --cache (default: a temporary folder).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchkit and bench, beside this file

from bench import REPO, write_json  # noqa: E402
from benchkit import kitdata  # noqa: E402

RECORD = REPO / "tools" / "regression.json"
CALIB_SIZE = 256
CALIB_SEED = 0
LOSSES = ("final_loss", "exported_loss")
PASSING = ("same", "skipped")


@dataclass(frozen=True)
class Entry:
    """One CLI run of the matrix: ``model`` is a kit model (kitdata's name), or None for the
    repository's digits CNN; ``flags`` follow IN, OUT and --calib."""

    name: str
    model: str | None
    flags: tuple[str, ...]


def _bits(w: int, a: int) -> tuple[str, ...]:
    return ("--weight-bits", str(w), "--act-bits", str(a))


MATRIX = (
    *(Entry(f"digits_w{w}a{a}_{method}", None, (*_bits(w, a), "--method", method))
      for w, a in ((8, 8), (4, 4), (3, 3), (2, 4)) for method in ("minmax", "lapq")),
    Entry("cifar10_resnet20_w8a8_minmax", "cifar10_resnet20", (*_bits(8, 8), "--method", "minmax")),
    Entry("cifar10_resnet20_w4a4_lapq", "cifar10_resnet20", (*_bits(4, 4), "--method", "lapq", "--max-evals", "200")),
    Entry("mobilenet_v2_zoo_int8dq_w4a8_lapq", "mobilenet_v2_zoo_int8dq",
          (*_bits(4, 8), "--method", "lapq", "--max-evals", "40", "--search-samples", "32")),
    Entry("all-MiniLM-L6-v2_w8a8_minmax", kitdata.TEXT_MODEL, (*_bits(8, 8), "--method", "minmax")),
    Entry("all-MiniLM-L6-v2_w4_weight_only", kitdata.TEXT_MODEL, ("--weight-only", "--weight-bits", "4")),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, default=Path(os.environ.get("ONNX_LAPQ_KIT", REPO.parent / "shared" / "kit")))
    ap.add_argument("--record", action="store_true", help="write the results to --json instead of comparing with it")
    ap.add_argument("--only", help="run the entries whose name contains this text")
    ap.add_argument("--cache", type=Path, help="folder for the kit models' calibration npz (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=RECORD, help=f"the recorded results (default {RECORD.relative_to(REPO)})")
    a = ap.parse_args(argv)
    a.kit = a.kit.resolve()
    a.entries = [e for e in MATRIX if not a.only or a.only in e.name]
    if not a.entries:
        ap.error(f"--only {a.only!r} matches no entry; the entries are: {', '.join(e.name for e in MATRIX)}")
    return a


def lapq_commit() -> str:
    """HEAD's commit, with -dirty when onnx_lapq/ differs from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "no commit"
    return head + ("-dirty" if git("diff", "--quiet", "HEAD", "--", "onnx_lapq").returncode else "")


def kit_inputs(kit: Path, model: str, cache: Path, calib: dict) -> tuple[Path, Path] | None:
    """(model, calibration npz) of a kit model, the npz made once per run (in ``calib``);
    None when the kit lacks the model's files."""
    if model not in calib:
        try:
            path = kitdata.model_path(kit, model)
            # the calibration draw does not depend on quick, which only shrinks the scored split loaded here
            npz = kitdata.build_task(kit, model, cache, CALIB_SIZE, True, CALIB_SEED).calib_npz
            calib[model] = (path, npz) if path.exists() else None
        except (OSError, KeyError):
            calib[model] = None
    return calib[model]


def cli_args(entry: Entry, kit: Path, inputs: tuple[Path, Path] | None) -> list[str]:
    """The entry's CLI arguments with KIT, CACHE and OUT standing for their folders."""
    if entry.model is None:
        model, npz = "models/digits_cnn.onnx", "models/digits_cnn_calib.npz"
    else:
        model, npz = f"KIT/{inputs[0].relative_to(kit).as_posix()}", f"CACHE/{inputs[1].name}"
    return [model, "OUT/model.onnx", "--calib", npz, *entry.flags, "--report", "OUT/report.json"]


def real_args(args: list[str], folders: dict[str, Path]) -> list[str]:
    """``args`` with each leading KIT/, CACHE/ or OUT/ (a key of ``folders``) replaced by its folder."""
    return [str(folders[head] / rest) if head in folders else arg
            for arg in args for head, _, rest in [arg.partition("/")]]


def run_entry(args: list[str], folders: dict[str, Path]) -> dict:
    """Run the CLI on ``args`` with KIT and CACHE taken from ``folders`` and OUT a temporary
    folder: the sha256 of OUT's model, its report's losses and the seconds, or the CLI's error."""
    with tempfile.TemporaryDirectory(prefix="onnx_lapq_regression_") as out:
        argv = real_args(args, {**folders, "OUT": Path(out)})
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "onnx_lapq", *argv], cwd=REPO, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        if proc.returncode:
            lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()
            return {"error": lines[-1], "seconds": seconds}
        report = json.loads((Path(out) / "report.json").read_text())
        sha = hashlib.sha256((Path(out) / "model.onnx").read_bytes()).hexdigest()
    return {"sha256": sha, **{k: report[k] for k in LOSSES if k in report}, "seconds": seconds}


def compare(result: dict, recorded: dict | None) -> str:
    if recorded is None:
        return "not recorded"
    if result["args"] != recorded["args"]:
        return "args changed"
    if "error" in result:
        return "error"
    same = result["sha256"] == recorded["sha256"] and all(result.get(k) == recorded.get(k) for k in LOSSES)
    return "same" if same else "different"


def changes(result: dict, recorded: dict | None) -> str:
    """The hash when it is not the recorded one, and final_loss and exported_loss minus the
    recorded ones where both runs have them."""
    recorded = recorded or {}
    parts = [f"{k} {result[k] - recorded[k]:+.3g}" for k in LOSSES if k in result and k in recorded]
    if "sha256" in recorded and result["sha256"] != recorded["sha256"]:
        parts.insert(0, f"sha256 {result['sha256'][:12]} (recorded {recorded['sha256'][:12]})")
    return ", ".join(parts)


def table_row(name: str, status: str, result: dict, recorded: dict | None) -> str:
    detail = result.get("error") or result.get("skipped") or changes(result, recorded)
    seconds = f"{result['seconds']:7.1f} s" if "seconds" in result else " " * 9
    return f"{name:36} {status:13} {seconds}  {detail}"


def run_matrix(a: argparse.Namespace, cache: Path) -> dict[str, dict]:
    """Each selected entry's result ({"skipped": why} for those without kit files), printed as it finishes."""
    calib: dict = {}
    recorded = read_record(a.json)
    env = {"commit": lapq_commit(), "onnxruntime": _ort_version()}
    results = {}
    for entry in a.entries:
        inputs = None if entry.model is None else kit_inputs(a.kit, entry.model, cache, calib)
        if entry.model is not None and inputs is None:
            results[entry.name] = {"skipped": f"{entry.model} is not in the kit at {a.kit}"}
            print(table_row(entry.name, "skipped", results[entry.name], None), flush=True)
            continue
        args = cli_args(entry, a.kit, inputs)
        result = {"args": args, **run_entry(args, {"KIT": a.kit, "CACHE": cache}), **env}
        results[entry.name] = result
        status = "recorded" if a.record and "error" not in result else compare(result, recorded.get(entry.name))
        print(table_row(entry.name, status, result, recorded.get(entry.name)), flush=True)
    return results


def read_record(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text())["entries"] if path.exists() else {}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def record(a: argparse.Namespace, results: dict[str, dict]) -> int:
    """Write the results that ran (keeping recorded entries this run did not select), in matrix order."""
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        print(f"not recorded: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    entries = {**read_record(a.json), **{n: r for n, r in results.items() if "skipped" not in r}}
    order = [e.name for e in MATRIX]
    write_json(a.json, {"entries": {n: entries[n] for n in sorted(entries, key=order.index)}})
    print(f"wrote {a.json}")
    return 0


def check(a: argparse.Namespace, results: dict[str, dict]) -> int:
    recorded = read_record(a.json)
    statuses = ["skipped" if "skipped" in r else compare(r, recorded.get(n)) for n, r in results.items()]
    versions = {r["onnxruntime"] for n, r in recorded.items() if n in results} - {_ort_version()}
    if versions:
        print(f"note: recorded with onnxruntime {', '.join(sorted(versions))}, checked with {_ort_version()}")
    bad = len(statuses) - sum(s in PASSING for s in statuses)
    print(f"{len(statuses) - bad} of {len(statuses)} entries same or skipped; {bad} differ")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnx_lapq_regression_cache_") as tmp:
        results = run_matrix(a, (a.cache or Path(tmp)).resolve())
    return record(a, results) if a.record else check(a, results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
