#!/usr/bin/env python3
"""Measured weight sensitivities of a kit model: ΔL per layer and width, and their time.

    python tools/sensitivity.py --kit ../shared/kit --model mobilenet_v2_zoo_int8dq \
        [--widths 2,3,4,8] [--calib-size 256] [--method mse] [--executor local] [--proxy] [--json OUT.json]

Quantizes the model at 8 bits (weights and activations, --method clipping) to get its plan,
ranges and solution, then measures for every weight site and every width of --widths below 8
the calibration loss increase when only that weight is at that width, rounded to nearest
(onnx_lapq.sensitivity.weight_sensitivities, on --executor).  With --proxy, also the
noise-probe proxy (onnx_lapq.noiseprobe: one probe per layer) and its Spearman rank
correlation with the measured values, over all (layer, width) and per width.
Prints the seconds of each, and per layer its ΔL.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from benchkit import kitdata  # noqa: E402
from benchkit.runners import load_batches  # noqa: E402
from onnx_lapq import QuantConfig, quantize  # noqa: E402
from onnx_lapq.graph import normalize  # noqa: E402
from onnx_lapq.noiseprobe import proxy_sensitivities  # noqa: E402
from onnx_lapq.sensitivity import ProbeJob, WidthProbe, weight_sensitivities  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--widths", default="2,3,4,8")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--method", default="mse")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/onnx_lapq_sensitivity_cache"))
    ap.add_argument("--executor", default="local")
    ap.add_argument("--proxy", action="store_true", help="also the noise-probe proxy, and its rank correlation with the measured values")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    widths = tuple(int(w) for w in a.widths.split(","))
    task = kitdata.build_task(a.kit, a.model, a.cache, a.calib_size, False, 0)
    batches = load_batches(str(task.calib_npz), 32)
    model = onnx.load(task.model_path)
    started = time.perf_counter()
    result = quantize(model, batches, config=QuantConfig(method=a.method, bias_correction=False))
    normalized = normalize(model)
    probe = WidthProbe(result.plan, result.solution.ranges, result.solution, a.method, weight_symmetric=True, act_symmetric=False)
    job = ProbeJob(normalized, probe, batches, "auto", 1 << 30)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    single = weight_sensitivities(job, widths, a.executor)
    probing = time.perf_counter() - started
    probes = sum(len(v) for v in single.values())
    print(f"{a.model}: {len(single)} layers, {probes} probes at widths {widths} on {a.executor}; set-up {setup:.1f} s, probes {probing:.1f} s "
          f"(each worker opens its own evaluator within that)")
    for node, by_bits in reversed(list(single.items())):
        print(f"  {node[:50]:50s} " + "  ".join(f"{b}b {v:.4g}" for b, v in sorted(by_bits.items())))
    report = {"model": a.model, "executor": a.executor, "setup_seconds": setup, "probe_seconds": probing, "sensitivities": single}
    if a.proxy:
        from scipy.stats import spearmanr
        started = time.perf_counter()
        proxy = proxy_sensitivities(job, widths, 0, a.executor)
        seconds = time.perf_counter() - started
        keys = [(n, b) for n, by_bits in single.items() for b in by_bits]
        overall = spearmanr([single[n][b] for n, b in keys], [proxy[n][b] for n, b in keys]).statistic
        per_width = {b: spearmanr([single[n][b] for n, w in keys if w == b], [proxy[n][b] for n, w in keys if w == b]).statistic
                     for b in sorted({b for _, b in keys})}
        print(f"proxy: {len(proxy)} probes in {seconds:.1f} s; Spearman with the measured values {overall:.3f} over all, "
              + ", ".join(f"{rho:.3f} at {b} bits" for b, rho in per_width.items()))
        report.update(proxy=proxy, proxy_seconds=seconds, spearman=overall, spearman_per_width=per_width)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
