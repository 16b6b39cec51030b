#!/usr/bin/env python3
"""Check that a bench `ort-*` row is what quantize_static gives when called by hand.

    python tools/check_ort_row.py --kit ../shared/kit --bench-out bench_out \
        --model cifar10_resnet20 --config w8a8 --method ort-minmax

Calls onnxruntime.quantization.quantize_static directly on the bench's own
calibration npz (QDQ, per-channel weights, the row's types and calibration
method; the same quant_pre_process step the bench takes), scores the result on
the bench's scored split, and prints both metrics, their difference, and whether
the two model files are byte-identical. Exit status 1 when the metrics differ by
more than --tolerance points (default 0.5).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import kitdata, measure  # noqa: E402

CALIBRATION = {"ort-minmax": "MinMax", "ort-entropy": "Entropy", "ort-percentile": "Percentile"}
TYPES = {4: ("QInt4", "QUInt4"), 8: ("QInt8", "QUInt8"), 16: ("QInt16", "QUInt16")}


def by_hand(model_path: Path, calib_npz: Path, out: Path, weight_bits: int, act_bits: int, method: str) -> None:
    """quantize_static with a plain CalibrationDataReader over the npz in batches of 32."""
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = np.load(calib_npz)
    n = len(data[data.files[0]])
    batches = iter([{k: data[k][i:i + 32] for k in data.files} for i in range(0, n, 32)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(model_path), str(pre))
    except Exception:  # the bench records the same fallback in the row's notes
        pre = model_path
    model = onnx.load(pre)
    if {weight_bits, act_bits} - {8}:
        model = version_converter.convert_version(model, 21)
        model.ir_version = max(model.ir_version, 10)
    quantize_static(model, str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=getattr(QuantType, TYPES[weight_bits][0]), activation_type=getattr(QuantType, TYPES[act_bits][1]),
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION[method]))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, required=True)
    ap.add_argument("--bench-out", type=Path, required=True, help="the --out dir of a full (not --quick) bench run")
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default="w8a8")
    ap.add_argument("--method", default="ort-minmax", choices=sorted(CALIBRATION))
    ap.add_argument("--tolerance", type=float, default=0.5)
    a = ap.parse_args(argv)
    rows = [r for r in json.loads((a.bench_out / "results.json").read_text())
            if (r["model"], r["config"], r["method"], r["quick"], r["seed"]) == (a.model, a.config, a.method, False, 0)]
    if not rows or rows[0].get("metric") is None:
        ap.error(f"no scored row {a.model} {a.config} {a.method} in {a.bench_out / 'results.json'}: run the bench for it first")
    row = rows[0]
    task = kitdata.build_task(a.kit, a.model, a.bench_out / "cache", row["calib_size"], False, 0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "by_hand.onnx"
        by_hand(task.model_path, task.calib_npz, out, row["weight_bits"], row["act_bits"], a.method)
        metric = task.evaluate(measure.make_session(str(out), 2))
        same = Path(row["model_path"]).exists() and out.read_bytes() == Path(row["model_path"]).read_bytes()
    diff = metric - row["metric"]
    print(f"{a.model} {a.config} {a.method}: bench row {row['metric']:.3f}, by hand {metric:.3f}, "
          f"difference {diff:+.3f} points; model files {'byte-identical' if same else 'differ'}")
    return 0 if abs(diff) <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
