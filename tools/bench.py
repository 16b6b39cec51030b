#!/usr/bin/env python3
"""Benchmark onnx_lapq against FP32 and ONNX Runtime's quantize_static on the kit.

    python tools/bench.py --kit ../shared/kit --out bench_out \
        [--models M1,M2] [--configs w8a8,w4a8,w4a4,...] \
        [--methods ort-minmax,ort-entropy,ort-percentile,minmax,percentile,entropy,mse,lapq] \
        [--calib-size 256] [--quick] [--force] [--threads 2]

Models: every kit model (eval.py's MODELS table gives preprocessing and labels)
plus all-MiniLM-L6-v2 (STS-B Spearman x100). Configs: `w{W}a{A}` = W-bit
per-channel weights, A-bit activations; `w{W}a{A}-pt` = per-tensor weights.
`w{W}a{A}-fl` = first and last layers at 8 bits.
Methods: `ort-minmax|ort-entropy|ort-percentile` run onnxruntime's
quantize_static (QDQ; see benchkit/runners.py); any other name is passed to
onnx_lapq as QuantConfig(method=...), and `WEIGHTS+METHOD` (e.g. gptq+lapq) as
QuantConfig(weights=WEIGHTS, method=METHOD); a leading `N:M[_MASKS][_norepair]+` (e.g.
2:4_transposable+minmax) prunes to N:M first (SparsityOptions); a leading `mixed-bB+`,
`mixed-sS+`, `mixed-cC+` or `mixed-rR+` (e.g. mixed-b4+adaround+mse, with --configs w8a8) chooses each
layer's weight width among 2, 3, 4 and 8 bits under B bits a weight on average, S of the
float32 bytes, C of the bit operations with float32 weights, or as the smallest model within
R times the 8-bit model's calibration loss;
`mixed-b4-pairs+` adds neighbour interactions, `mixed-b4-proxy+` uses the noise-probe proxy,
`mixed-c0.0625-acts+` also chooses each layer input's width among 4 and 8 bits. A method/config a tool refuses becomes a
row with `error` set, never a missing row.

Fixed splits (seed 0 unless --seed; details in benchkit/kitdata.py):
  ImageNet models calibrate on a seeded subset of imagenet_eli1000 and are
  scored on all of imagenet_acuity1300; CIFAR-10 and MNIST calibrate on a seeded
  subset of their test set and are scored on the rest; MiniLM calibrates on
  STS-B dev sentences and is scored on STS-B test. Both tools get the same
  calibration batches (DIR/cache/calib__*.npz, batches of 32).
--quick: 64 calibration samples (unless --calib-size), scored on seeded subsets
  of 500 CIFAR/MNIST images, 200 ImageNet images, 200 STS pairs; 3 latency reps.

Each quantization runs in a fresh subprocess (`bench.py _worker JOB`) that
reports its wall seconds and peak RSS; the parent scores the saved model
(DIR/models/) with onnxruntime (CPU, ENABLE_ALL, --threads intra-op threads)
and times it against FP32 on the same batch of 32, interleaved, in the same run.

Outputs: DIR/results.json (list of rows: model, config, method, metric,
fp32_metric, kit_metric (eval.py's own top-1, ties broken by its argsort), quant_seconds, peak_rss_mb, ms_per_item, fp32_ms_per_item,
metric_name, drop, speedup, error, error_stage, notes, git (the commit), ...), DIR/results.md, DIR/accuracy_vs_bits.png,
DIR/quant_time.png. Resumable: FP32 metrics are cached in DIR/cache/fp32.json
and finished rows (key: model, config, method, quick, calib_size, seed) are
reused unless --force; rows whose tool could not even be imported are redone.
--rescore: the finished rows' (of --configs, --methods) saved models (DIR/models/, or the row's absolute
model_path) scored again, FP32 too, after a change to the scoring; nothing is
quantized or timed.
--merge DIR...: runs split over several output dirs (say, rows re-run at a later
commit) become one results.json and report in --out; each row keeps its `git`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark the onnx_lapq of this checkout

import onnx  # noqa: E402

from benchkit import kitdata, measure, report, runners  # noqa: E402
from onnx_lapq.inspect import inspect_model  # noqa: E402
from onnx_lapq.options import SEARCH_BIAS_CORRECTION  # noqa: E402

ALL_METHODS = "ort-minmax,ort-entropy,ort-percentile,minmax,percentile,entropy,mse,lapq"
DEFAULT_CONFIGS = "w8a8,w8a8-pt,w4a8,w4a4"
CALIB_BATCH = 32
SEARCH_FIELDS = ("nfev", "final_loss", "exported_loss", "evaluator")  # of a lapq report, for the summary table


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, default=Path(os.environ.get("ONNX_LAPQ_KIT", REPO.parent / "shared" / "kit")))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", help="comma-separated kit models (default: all)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--methods", default=ALL_METHODS)
    ap.add_argument("--calib-size", type=int, help="calibration samples (default 256, 64 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small data sizes for a CI smoke run")
    ap.add_argument("--force", action="store_true", help="recompute rows found in results.json")
    ap.add_argument("--rescore", action="store_true", help="only score the saved models of finished rows again (metric, kit_metric, FP32)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for scoring and timing")
    ap.add_argument("--reps", type=int, help="latency rounds (default 10, 3 with --quick)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per quantization")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lapq-time-limit", type=float, default=None, help="seconds for lapq's search (default: no limit)")
    ap.add_argument("--lapq-max-evals", type=int, default=None, help="loss evaluations for lapq's search (default: the library's)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                    help="only merge the rows of these earlier --out dirs into --out (later dirs win) and write the report")
    ap.add_argument("--lapq-search-samples", type=int, default=None, help="calibration samples lapq's loss uses (default: all)")
    ap.add_argument("--lapq-search-bias-correction", choices=SEARCH_BIAS_CORRECTION, default=None,
                    help="whether lapq's search keeps bias correction (default: the library's, auto)")
    a = ap.parse_args(argv)
    a.calib_size = a.calib_size or (64 if a.quick else 256)
    a.reps = a.reps or (3 if a.quick else 10)
    known = kitdata.kit_models(a.kit)
    a.models = a.models.split(",") if a.models else known
    a.configs = a.configs.split(",")
    a.methods = a.methods.split(",")
    for m in a.models:
        if m not in known:
            ap.error(f"unknown model {m!r}; the kit has: {', '.join(known)}")
    for c in a.configs:
        if not report.CONFIG_RE.match(c):
            ap.error(f"config {c!r} is not w<bits>a<bits>[-pt|-wo|-fl], e.g. w8a8, w4a8-pt, w4a8-wo, w4a4-fl")
    return a


def parse_config(config: str) -> tuple[int, int, bool, bool, bool]:
    """(weight bits, activation bits, per-channel, weight-only, first and last layers at 8 bits) of a config name."""
    m = report.CONFIG_RE.match(config)
    return int(m[1]), int(m[2]), m[3] != "-pt", m[3] == "-wo", m[3] == "-fl"


def row_key(r: dict) -> tuple:
    return (r["model"], r["config"], r["method"], r["quick"], r["calib_size"], r["seed"])


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def is_finished(row: dict) -> bool:
    return row.get("error_stage") != "setup"


def file_tag(a: argparse.Namespace) -> str:
    if not a.quick and a.calib_size == 256 and a.seed == 0:
        return ""
    return f"__{'quick' if a.quick else 'full'}-c{a.calib_size}-s{a.seed}"


def fp32_reference(a: argparse.Namespace, task: kitdata.Task, fp32_sess, fresh: bool = False) -> dict:
    """FP32 metric of the task's scored split, cached in DIR/cache/fp32.json (measured
    again when ``fresh``)."""
    path = a.out / "cache" / "fp32.json"
    cache = read_json(path, {})
    key = f"{task.model}|quick={a.quick}|calib={a.calib_size}|seed={a.seed}"
    if fresh or key not in cache:
        t0 = time.perf_counter()
        cache[key] = {"metric": task.evaluate(fp32_sess), "metric_name": task.metric_name,
                      "n_eval": task.n_eval, "eval_seconds": time.perf_counter() - t0}
        write_json(path, cache)
    return cache[key]


def quantize_row(a: argparse.Namespace, task: kitdata.Task, config: str, method: str) -> dict:
    """Quantize in a worker subprocess; the row's quantization fields."""
    w, act, per_channel, weight_only, first_last = parse_config(config)
    stem = f"{task.model}__{config}__{method}{file_tag(a)}"
    job = {"tool": runners.tool_of(method), "method": method, "model": task.model,
           "model_path": str(task.model_path), "calib_npz": str(task.calib_npz),
           "weight_bits": w, "act_bits": act, "per_channel": per_channel, "weight_only": weight_only,
           "keep_first_last_8bit": first_last, "seed": a.seed,
           "batch_size": CALIB_BATCH, "out_model": str(a.out / "models" / f"{stem}.onnx"),
           "report_path": str(a.out / "reports" / f"{stem}.json"),
           "search": {k: v for k, v in (("time_limit", a.lapq_time_limit), ("max_evals", a.lapq_max_evals),
                                        ("search_samples", a.lapq_search_samples),
                                        ("search_bias_correction", a.lapq_search_bias_correction)) if v is not None and method.endswith("lapq")}}
    for d in ("models", "reports"):
        (a.out / d).mkdir(parents=True, exist_ok=True)
    res = runners.quantize_in_subprocess(job, Path(__file__).resolve(), a.out / "jobs", a.timeout)
    row = {"model": task.model, "config": config, "method": method, "tool": job["tool"],
           "weight_bits": w, "act_bits": act, "per_channel": per_channel,
           "quick": a.quick, "calib_size": a.calib_size, "seed": a.seed, **res}
    if not res.get("error"):
        row["model_path"] = job["out_model"]
        attach_report(row, Path(job["report_path"]))
        facts = inspect_model(onnx.load(job["out_model"]))
        row["weight_bytes"], row["sparse_weight_bytes"] = sum(f.weight_bytes for f in facts), sum(f.sparse_bytes for f in facts)
    return row


def attach_report(row: dict, path: Path, max_inline: int = 4000) -> None:
    """The quantizer's report in the row: whole when short; else its path, and the search
    figures the summary table shows (SEARCH_FIELDS), so that the row keeps them when the
    report file is gone (results.json is committed, report files are not)."""
    if not path.exists():
        return
    text = path.read_text()
    if len(text) <= max_inline:
        row["report"] = json.loads(text)
    else:
        row["report_path"] = str(path)
        report = json.loads(text)
        row["search"] = {k: report[k] for k in SEARCH_FIELDS if k in report}


def read_rows(path: Path) -> list[dict]:
    """The rows of a results.json; a row without its search figures gets them from its
    report file where that still exists."""
    rows = read_json(path, [])
    for row in rows:
        if "report" not in row and "search" not in row and row.get("report_path"):
            attach_report(row, Path(row["report_path"]))
    return rows


def score_row(a: argparse.Namespace, task: kitdata.Task, row: dict, fp32_sess) -> None:
    """Metric and interleaved latency of the quantized model (errors go in the row)."""
    try:
        sess = measure.make_session(row["model_path"], a.threads)
    except Exception as e:
        row.update(error=f"fails to load at ORT_ENABLE_ALL: {e}", error_type=type(e).__name__, error_stage="load")
        return
    try:
        set_metric(task, row, sess)
        row["ms_per_item"], row["fp32_ms_per_item"] = measure.interleaved_ms_per_item(
            sess, fp32_sess, task.latency_feed, a.reps)
        row["speedup"] = row["fp32_ms_per_item"] / row["ms_per_item"]
    except Exception as e:
        row.update(error=f"fails to run: {e}", error_type=type(e).__name__, error_stage="eval")


def set_metric(task: kitdata.Task, row: dict, sess) -> None:
    """The row's metric, eval.py's own figure where the task has one, and the drop."""
    outputs = task.outputs(sess)
    row["metric"] = task.score(outputs)
    row["kit_metric"] = task.kit_score(outputs) if task.kit_score else None
    row["drop"] = row["metric"] - row["fp32_metric"]


def rescore_model(a: argparse.Namespace, model: str, rows: dict) -> None:
    """--rescore: the metrics of the model's finished rows of --configs and --methods from
    their saved models again (FP32's too); quantization and latency figures stay as they are."""
    mine = [r for r in rows.values() if r["model"] == model and not r.get("error")
            and r["config"] in a.configs and r["method"] in a.methods and of_this_run(a, r)]
    if not mine:
        return
    task = kitdata.build_task(a.kit, model, a.out / "cache", a.calib_size, a.quick, a.seed)
    fp32 = fp32_reference(a, task, measure.make_session(str(task.model_path), a.threads), fresh=True)["metric"]
    for row in mine:
        row["fp32_metric"] = fp32
        set_metric(task, row, measure.make_session(str(runners.saved_model(row, a.out)), a.threads))
        print(f"  {model} {row['config']} {row['method']}: {row['metric_name']} {row['metric']:.2f} (kit {report._fmt(row['kit_metric'])})", flush=True)
    write_json(a.out / "results.json", list(rows.values()))


def of_this_run(a: argparse.Namespace, row: dict) -> bool:
    """Whether the row was made with this run's data sizes and seed."""
    return (row["quick"], row["calib_size"], row["seed"]) == (a.quick, a.calib_size, a.seed)


def bench_model(a: argparse.Namespace, model: str, rows: dict) -> None:
    todo = [(c, m) for c in a.configs for m in a.methods
            if a.force or not is_finished(rows.get((model, c, m, a.quick, a.calib_size, a.seed), {"error_stage": "setup"}))]
    if not todo:
        print(f"{model}: all {len(a.configs) * len(a.methods)} rows cached", flush=True)
        return
    t0 = time.perf_counter()
    task = kitdata.build_task(a.kit, model, a.out / "cache", a.calib_size, a.quick, a.seed)
    fp32_sess = measure.make_session(str(task.model_path), a.threads)
    ref = fp32_reference(a, task, fp32_sess)
    print(f"{model}: FP32 {task.metric_name} {ref['metric']:.2f} on {task.n_eval} items "
          f"(setup {time.perf_counter() - t0:.1f} s)", flush=True)
    for i, (config, method) in enumerate(todo, 1):
        row = quantize_row(a, task, config, method)
        row.update(metric_name=task.metric_name, metric=None, fp32_metric=ref["metric"],
                   n_eval=task.n_eval, n_calib=task.n_calib, ms_per_item=None, fp32_ms_per_item=None)
        if not row.get("error"):
            score_row(a, task, row, fp32_sess)
        row["timestamp"] = datetime.datetime.now().isoformat(timespec="seconds")
        row["git"] = a.git
        rows[row_key(row)] = row
        write_json(a.out / "results.json", list(rows.values()))
        print(f"  [{i}/{len(todo)}] {progress_line(row)}", flush=True)


def progress_line(r: dict) -> str:
    head = f"{r['model']} {r['config']} {r['method']}:"
    if r.get("error"):
        return f"{head} ERROR ({r['error_stage']}) {report._short(r['error'], 200)}"
    return (f"{head} {r['metric_name']} {r['metric']:.2f} (FP32 {r['fp32_metric']:.2f}), "
            f"quant {r['quant_seconds']:.2f} s / {r['peak_rss_mb']:.0f} MB, "
            f"{r['ms_per_item']:.3f} vs FP32 {r['fp32_ms_per_item']:.3f} ms/item")


def git_describe() -> str:
    """The checkout's commit (with -dirty when it has uncommitted changes): recorded in every row."""
    return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip() or "no commit"


def run_meta(a: argparse.Namespace, rows: list[dict]) -> dict:
    import numpy
    import onnx
    import onnxruntime

    try:
        import onnx_lapq

        lapq = f"{getattr(onnx_lapq, '__version__', '?')} ({Path(onnx_lapq.__file__).parent})"
    except ImportError as e:
        lapq = f"not importable ({e})"
    commits = sorted({r.get("git", "not recorded") for r in rows})
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python tools/bench.py", *sys.argv[1:]]),
            "git": git_describe(), "rows made at commits": ", ".join(commits), "onnx_lapq": lapq, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "threads": a.threads, "calib_size": a.calib_size, "quick": a.quick, "seed": a.seed,
            "kit": str(a.kit.resolve())}


def write_report(a: argparse.Namespace, rows: dict) -> None:
    mine = [r for r in rows.values() if of_this_run(a, r)]
    splits = kitdata.describe_splits(a.calib_size, a.quick, a.seed)
    report.write_markdown(a.out / "results.md", mine, run_meta(a, mine), splits)
    report.write_plots(a.out, mine)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        job = json.loads(Path(argv[1]).read_text())
        write_json(Path(job["result_path"]), runners.run_job(job))
        return 0
    a = parse_args(argv)
    a.git = git_describe()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = {row_key(r): r for r in read_rows(a.out / "results.json")}
    if a.merge:
        for src in a.merge:
            rows.update({row_key(r): r for r in read_rows(src / "results.json")})
        write_json(a.out / "results.json", list(rows.values()))
        write_report(a, rows)
        print(f"merged {len(rows)} rows into {a.out / 'results.json'}; wrote results.md, plots", flush=True)
        return 0
    for model in a.models:
        (rescore_model if a.rescore else bench_model)(a, model, rows)
    write_report(a, rows)
    print(f"wrote {a.out / 'results.json'}, {a.out / 'results.md'}, plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
