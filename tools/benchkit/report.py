"""results.md (one table per model) and PNG plots from benchmark rows.

Columns: drop = metric - FP32 metric (points); gap to best ORT = metric - the
best ort-* metric at the same config (points; positive = better than ORT);
speed-up = FP32 ms/item / quantized ms/item, both timed in the same run.  top-1
splits ties (kitdata.top1_ties_split); the note gives eval.py's own top-1 where its
argsort's tie-breaking made it differ.
Plots (matplotlib, Agg): accuracy_vs_bits.png (a subplot per model, x = config
ordered by bits, a series per method (ORT dashed, hollow markers), FP32 dotted)
and quant_time.png (mean quant seconds over configs per method, a group per
model, log scale; runs the tool refused are left out).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from .runners import tool_of

# w<W>a<A> (per-channel weights), w<W>a<A>-pt (per-tensor), w<W>a<A>-wo (weight-only: activations stay float),
# w<W>a<A>-fl (first and last layers at 8 bits)
CONFIG_RE = re.compile(r"^w(\d+)a(\d+)(-pt|-wo|-fl)?$")
MARKERS = "os^Dv<>p*h"


NOT_UNIFORM = re.compile(r"(\d+:\d+|mixed-[bscr][\d.]+(-[a-z]+)*)[_+]")  # a method that prunes to N:M or chooses widths per layer first


def config_order(config: str) -> tuple:
    m = CONFIG_RE.match(config)
    return (-int(m[1]), -int(m[2]), m[3] or "") if m else (0, 0, config)


def _fmt(v, digits=2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["model"]].append(r)
    return out


def best_ort(rows: list[dict]) -> dict[str, float]:
    """config -> best ort-* metric among the given rows of one model."""
    best = {}
    for r in rows:
        if tool_of(r["method"]) == "ort" and r.get("metric") is not None:
            best[r["config"]] = max(best.get(r["config"], -math.inf), r["metric"])
    return best


def _table(rows: list[dict]) -> list[str]:
    best = best_ort(rows)
    lines = ["| config | method | metric | drop vs FP32 | gap to best ORT | quant s | peak RSS MB "
             "| ms/item | FP32 ms/item | speed-up | note |", "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (config_order(r["config"]), r["method"])):
        m, gap = r.get("metric"), None
        if m is not None and r["config"] in best:
            gap = m - best[r["config"]]
        drop = None if m is None else m - r["fp32_metric"]
        speed = r["fp32_ms_per_item"] / r["ms_per_item"] if r.get("ms_per_item") else None
        note = "; ".join(filter(None, [_short(r.get("error")), _kit_figure(r), *r.get("notes", [])[:1]]))
        secs, rss = (r.get("quant_seconds"), r.get("peak_rss_mb")) if _quantized(r) else (None, None)
        lines.append(f"| {r['config']} | {r['method']} | {_fmt(m)} | {_fmt(drop)} | {_fmt(gap)} "
                     f"| {_fmt(secs)} | {_fmt(rss, 0)} "
                     f"| {_fmt(r.get('ms_per_item'), 3)} | {_fmt(r.get('fp32_ms_per_item'), 3)} "
                     f"| {_fmt(speed)} | {note} |")
    return lines


def _kit_figure(row: dict) -> str | None:
    """eval.py's own top-1 where it differs from the row's (ties broken by its argsort)."""
    kit, metric = row.get("kit_metric"), row.get("metric")
    if kit is None or metric is None or abs(kit - metric) < 0.005:
        return None
    return f"eval.py's argsort top-1 {kit:.2f}"


def _summary(rows: list[dict]) -> list[str]:
    """One line per model and config: FP32, the best ORT method, the best per-tensor
    onnx_lapq calibrator, and lapq (metric and quantization seconds)."""
    lines = ["| model | config | FP32 | best ORT | best onnx_lapq calibrator | lapq | lapq s | evaluations | eval cost (x FP32 pass) | exported/final loss |",
             "|" + "---|" * 10]

    def best(candidates: list[dict]) -> str:
        scored = [r for r in candidates if r.get("metric") is not None]
        if not scored:
            return "fails" if candidates else ""
        top = max(scored, key=lambda r: r["metric"])
        return f"{top['metric']:.2f} ({top['method']})"

    for model, mrows in _by_model(rows).items():
        for config in sorted({r["config"] for r in mrows}, key=config_order):
            crows = [r for r in mrows if r["config"] == config]
            ort = [r for r in crows if tool_of(r["method"]) == "ort"]
            ours = [r for r in crows if tool_of(r["method"]) != "ort" and r["method"] != "lapq"]
            lapq = next((r for r in crows if r["method"] == "lapq"), None)
            lapq_metric = "" if lapq is None else ("fails" if lapq.get("metric") is None else f"{lapq['metric']:.2f}")
            ok = lapq is not None and lapq.get("metric") is not None
            seconds = _fmt(lapq.get("quant_seconds"), 0) if ok else ""
            found = _search_report(lapq) if ok else {}
            evals = str(found.get("nfev", ""))
            cost = _fmt(found.get("evaluator", {}).get("cost_ratio"))
            agree = _fmt(found["exported_loss"] / found["final_loss"], 4) if found.get("final_loss") else ""
            lines.append(f"| {model} | {config} | {crows[0]['fp32_metric']:.2f} | {best(ort)} | {best(ours)} | {lapq_metric} | {seconds} "
                         f"| {evals} | {cost} | {agree} |")
    return lines


def _search_report(row: dict) -> dict:
    """LAPQ's search figures of a row: its whole report, or the figures kept from a long one."""
    return row.get("report", row.get("search", {}))


def _short(text, limit=160) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit] + "..."


def write_markdown(path: Path, rows: list[dict], meta: dict, splits: list[str]) -> None:
    lines = ["# onnx_lapq benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Splits:", ""] + [f"- {s}" for s in splits]
    lines += ["", "drop = metric - FP32; gap = metric - best ort-* metric at the same config (points); "
              "speed-up = FP32 ms/item / quantized ms/item, timed interleaved in this run "
              "(batch 32, same threads). top-1 counts an item whose top score k classes share as 1/k "
              "when its label is one of them; the note gives eval.py's top-1 where its argsort broke such ties "
              "differently. Errors are the tool's own message.", ""]
    lines += ["## Summary", ""] + _summary(rows) + [""]
    for model, mrows in _by_model(rows).items():
        r0 = mrows[0]
        lines += [f"## {model}", "",
                  f"{r0['metric_name']} on {r0['n_eval']} items, {r0['n_calib']} calibration samples; "
                  f"FP32 {r0['fp32_metric']:.2f}", ""]
        lines += _table(mrows) + [""]
    path.write_text("\n".join(lines))


def write_plots(out_dir: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out_dir / "quant_time.png"]
    _plot_time(plt, paths[0], rows)
    dense = [r for r in rows if not NOT_UNIFORM.match(r["method"])]  # accuracy against the config's bits: dense, uniform rows; the others are in the tables
    if dense:
        paths.insert(0, out_dir / "accuracy_vs_bits.png")
        _plot_accuracy(plt, paths[0], dense)
    return paths


def _plot_accuracy(plt, path: Path, rows: list[dict]) -> None:
    models = _by_model(rows)
    methods = sorted({r["method"] for r in rows})  # one colour and marker per method in every subplot
    cols = min(3, len(models))
    nrows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, (model, mrows) in zip(axes.flat, models.items()):
        configs = sorted({r["config"] for r in mrows}, key=config_order)
        for i, method in enumerate(methods):
            vals = {r["config"]: r.get("metric") for r in mrows if r["method"] == method}
            if not vals:
                continue
            ys = [math.nan if vals.get(c) is None else vals[c] for c in configs]
            ort_style = tool_of(method) == "ort"
            ax.plot(configs, ys, color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], markersize=9 - i % 4,
                    fillstyle="none" if ort_style else "full", linestyle="--" if ort_style else "-", label=method)
        ax.axhline(mrows[0]["fp32_metric"], color="k", linestyle=":", label="FP32")
        ax.set_title(model)
        ax.set_ylabel(mrows[0]["metric_name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _quantized(row: dict) -> bool:
    """The tool produced a model (it may still fail to load): its time is a result."""
    return row.get("quant_seconds") is not None and row.get("error_stage") not in ("setup", "quantize")


def _plot_time(plt, path: Path, rows: list[dict]) -> None:
    import matplotlib.ticker

    models = list(_by_model(rows))
    methods = sorted({r["method"] for r in rows})
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(models) * max(1, len(methods)) / 3), 4.5))
    for j, method in enumerate(methods):
        ys = []
        for model in models:
            secs = [r["quant_seconds"] for r in rows
                    if r["model"] == model and r["method"] == method and _quantized(r)]
            ys.append(sum(secs) / len(secs) if secs else math.nan)
        ax.bar([i + j * width for i in range(len(models))], ys, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_ylabel("quantization wall s (mean over configs)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
