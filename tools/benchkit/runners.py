"""Quantization runners: one quantization per fresh subprocess, timed and RSS-measured.

The parent writes a job (JSON) and starts `python tools/bench.py _worker JOB`;
the worker loads the model and the calibration npz, times only the quantizer
call(s), saves the QDQ model and writes a result JSON with

    quant_seconds, peak_rss_mb (the worker's peak RSS, VmHWM), baseline_rss_mb
    (the same just before quantizing), tool_version, error, error_type,
    error_stage, notes

Tools:
- `ort-nbits` (weight-only configs): onnxruntime's MatMulNBitsQuantizer with its
  defaults (round to nearest, asymmetric) but blocks of 32, as onnx_lapq's weight-only rows.
- `ort-<minmax|entropy|percentile>`: onnxruntime.quantization.quant_pre_process
  (skipped for mnist8, where it crashes; on failure retried with
  skip_symbolic_shape=True (MiniLM needs this), then the raw model is used; a
  note says which), then, when a 4- or 16-bit type is asked for, the model is
  upgraded to opset 21, then quantize_static(QDQ, per_channel, QUInt<A>
  activations, QInt<W> weights, default op list and options). The calibration
  reader yields the same batches as onnx_lapq gets. quant_seconds covers all
  three steps.
- anything else: onnx_lapq.quantize(model, batches, config=QuantConfig(
  weight_bits, act_bits, per_channel, method, seed, batch_size)); `WEIGHTS+METHOD`
  sets weights=WEIGHTS (a reconstruction solver) and method=METHOD, and
  `WEIGHTS:key=value,...+METHOD` also ReconstructionOptions(key=value, ...), e.g.
  `gptq:qdrop=0.5+lapq`.  Weight-only rows that round to nearest get no calibration data
  (they read none; given some, onnx_lapq would also measure the result's fidelity on it).

Error stages: "setup" (the tool cannot be imported: not a result, retried on
resume), "quantize" (the tool refused or crashed: a result).
"""
from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ORT_PREFIX = "ort-"
NO_PRE_PROCESS = {"mnist8"}  # quant_pre_process crashes on it (ORT 1.31)
ORT_WIDE_OPSET = 21
WEIGHT_ONLY_BLOCK = 32  # weights per block of weight-only rows, both tools
MIXED_CANDIDATES = (2, 3, 4, 8)  # the widths a mixed-precision row chooses from (its config's weight bits: 8)
MIXED_ACT_CANDIDATES = (4, 8)  # the input widths a mixed-cC-acts row chooses from (its config's activation bits: 8)


def tool_of(method: str) -> str:
    return "ort" if method.startswith(ORT_PREFIX) else "onnx_lapq"


def load_batches(npz_path: str, batch_size: int) -> list[dict]:
    """Calibration npz (samples on axis 0) -> list of {input_name: batch} dicts."""
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def _rss_mb() -> float:
    """Peak RSS of this process image in MB.

    Linux: VmHWM. Not ru_maxrss, which after fork+exec starts at the parent's
    RSS (the parent holds the scored data set, hundreds of MB).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- worker side
def run_job(job: dict) -> dict:
    """Run one quantization job in this (fresh) process; never raises."""
    result = {"error": None, "error_type": None, "error_stage": None, "notes": []}
    try:
        quantizer = _ort_quantizer if job["tool"] == "ort" else _lapq_quantizer
        run = quantizer(job, result)
    except ImportError as e:
        return {**result, "error": str(e), "error_type": type(e).__name__, "error_stage": "setup"}
    batches = load_batches(job["calib_npz"], job["batch_size"])
    result["baseline_rss_mb"] = _rss_mb()
    t0 = time.perf_counter()
    try:
        run(batches)
    except Exception as e:  # a refusal or crash of the tool is a benchmark result
        result.update(error=str(e) or repr(e), error_type=type(e).__name__, error_stage="quantize")
    result["quant_seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = _rss_mb()
    return result


def _ort_types(bits: int, signed: bool):
    from onnxruntime.quantization import QuantType

    table = {4: ("QInt4", "QUInt4"), 8: ("QInt8", "QUInt8"), 16: ("QInt16", "QUInt16")}
    if bits not in table:
        raise ValueError(f"onnxruntime quantize_static has no {bits}-bit integer type (4, 8, 16)")
    return getattr(QuantType, table[bits][0 if signed else 1])


def _ort_quantizer(job: dict, result: dict):
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime import __version__
    from onnxruntime.quantization.shape_inference import quant_pre_process

    result["tool_version"] = f"onnxruntime {__version__}"

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    name = job["method"][len(ORT_PREFIX):]

    def run(batches):
        if job.get("keep_first_last_8bit"):
            raise ValueError("quantize_static has no per-layer bit-widths: no first/last 8-bit rows")
        if job.get("weight_only"):
            if name != "nbits":
                raise ValueError("quantize_static has no weight-only mode: weight-only rows run ORT's MatMulNBitsQuantizer (method ort-nbits)")
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # imports onnx_ir (the bench extra)

            quantizer = MatMulNBitsQuantizer(onnx.load(job["model_path"]), bits=job["weight_bits"], block_size=WEIGHT_ONLY_BLOCK)
            quantizer.process()
            quantizer.model.save_model_to_file(job["out_model"])
            return
        if name not in calib:
            raise ValueError(f"unknown ORT calibration method {name!r} (minmax, entropy, percentile)")
        w_type = _ort_types(job["weight_bits"], signed=True)
        a_type = _ort_types(job["act_bits"], signed=False)
        src = _ort_pre_process(job, result, quant_pre_process)
        model = onnx.load(src)
        if {job["weight_bits"], job["act_bits"]} - {8}:
            model = version_converter.convert_version(model, ORT_WIDE_OPSET)
            model.ir_version = max(model.ir_version, 10)
            result["notes"].append(f"upgraded to opset {ORT_WIDE_OPSET}")
        if src != job["model_path"]:
            Path(src).unlink()
        quantize_static(model, job["out_model"], Reader(batches), quant_format=QuantFormat.QDQ,
                        per_channel=job["per_channel"], activation_type=a_type, weight_type=w_type,
                        calibrate_method=calib[name])

    return run


def _ort_pre_process(job: dict, result: dict, quant_pre_process) -> str:
    """Path of the model quantize_static should read: pre-processed when that works."""
    if job["model"] in NO_PRE_PROCESS:
        result["notes"].append("quant_pre_process skipped (crashes on this model)")
        return job["model_path"]
    out = str(Path(job["out_model"]).with_suffix(".pre.onnx"))
    try:
        quant_pre_process(job["model_path"], out)
        return out
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
    try:  # ORT's advice for transformers whose symbolic shape inference fails
        quant_pre_process(job["model_path"], out, skip_symbolic_shape=True)
        result["notes"].append(f"quant_pre_process with skip_symbolic_shape=True ({failure})")
        return out
    except Exception as e:
        result["notes"].append(f"quant_pre_process failed, raw model used: {failure}; then {type(e).__name__}: {e}")
        return job["model_path"]


def _lapq_quantizer(job: dict, result: dict):
    import onnx
    import onnx_lapq
    from onnx_lapq import LapqOptions, QuantConfig, ReconstructionOptions, quantize  # ImportError while the package is incomplete
    from onnx_lapq.mixedoptions import MixedPrecisionOptions
    from onnx_lapq.options import SparsityOptions

    result["tool_version"] = f"onnx_lapq {_lapq_version(onnx_lapq)}"

    def run(batches):
        weight_only = {"weight_only": True, "op_types": ("MatMul", "Gather"), "block_size": WEIGHT_ONLY_BLOCK} if job.get("weight_only") else {}
        parts = job["method"].split("+")
        sparsity = _sparsity(parts.pop(0)) if len(parts) > 1 and re.fullmatch(r"\d+:\d+(_[a-z-]+)*", parts[0]) else SparsityOptions()
        mixed = _mixed(parts.pop(0)) if len(parts) > 1 and re.fullmatch(r"mixed-[bscr][\d.]+(-pairs|-proxy|-acts)*", parts[0]) else MixedPrecisionOptions()
        method = parts.pop()
        weights, _, options = "+".join(parts).partition(":")
        reconstruction = ReconstructionOptions(**{k: _number(v) for k, v in (o.split("=") for o in options.split(",") if o)})
        cfg = QuantConfig(weight_bits=job["weight_bits"], act_bits=job["act_bits"], **weight_only,
                          per_channel=job["per_channel"], method=method, weights=weights or "nearest", reconstruction=reconstruction,
                          keep_first_last_8bit=job.get("keep_first_last_8bit", False),
                          seed=job["seed"], batch_size=job["batch_size"], lapq=LapqOptions(**job.get("search", {})), sparsity=sparsity,
                          mixed_precision=mixed)
        data = None if cfg.weight_only and cfg.weight_rounding == "nearest" else batches  # rounding to nearest reads no data
        res = quantize(onnx.load(job["model_path"]), data, config=cfg)
        onnx.save(res.model, job["out_model"])
        Path(job["report_path"]).write_text(json.dumps(res.report, indent=1, default=str))

    return run


def _sparsity(spec: str):
    """SparsityOptions of a method's leading ``N:M[_MASKS][_norepair]``."""
    from onnx_lapq.options import SparsityOptions

    pattern, *flags = spec.split("_")
    masks = [f for f in flags if f != "norepair"]
    return SparsityOptions(pattern=pattern, masks=masks[0] if masks else "magnitude", repair="norepair" not in flags)


def _mixed(spec: str):
    """MixedPrecisionOptions of a method's leading ``mixed-bB`` (B bits a weight on average),
    ``mixed-sS`` (S of the float32 weights' bytes), ``mixed-cC`` (C of the bit operations with
    float32 weights) or ``mixed-rR`` (the smallest model within R
    times the 8-bit model's calibration loss), over the candidates MIXED_CANDIDATES; a
    ``-pairs`` suffix adds neighbour interactions, ``-proxy`` the noise-probe proxy of the
    sensitivities, ``-acts`` the input widths MIXED_ACT_CANDIDATES (with ``mixed-cC``)."""
    from onnx_lapq.mixedoptions import MixedPrecisionOptions

    budget, *flags = spec[len("mixed-"):].split("-")
    field = {"b": "target_bits", "s": "target_size", "c": "target_bops", "r": "max_loss_ratio"}[budget[0]]
    return MixedPrecisionOptions(candidate_bits=MIXED_CANDIDATES, candidate_act_bits=MIXED_ACT_CANDIDATES if "acts" in flags else (),
                                 interactions="pairs" in flags, sensitivity="proxy" if "proxy" in flags else "measured",
                                 **{field: float(budget[1:])})


def _number(text: str):
    """An option value of a method name: an int, a float, or a bool."""
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _lapq_version(module) -> str:
    from importlib import metadata

    try:
        return getattr(module, "__version__", None) or metadata.version("onnx_lapq")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


# ----------------------------------------------------------------------------- parent side
def quantize_in_subprocess(job: dict, bench_py: Path, job_dir: Path, timeout: float) -> dict:
    """Start the worker for `job`, wait, and return its result (errors included)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(job["out_model"]).stem
    job_path, result_path = job_dir / f"{stem}.job.json", job_dir / f"{stem}.result.json"
    log_path = job_dir / f"{stem}.log"
    for stale in (result_path, Path(job["out_model"]), Path(job["report_path"])):
        stale.unlink(missing_ok=True)
    job_path.write_text(json.dumps({**job, "result_path": str(result_path)}, indent=1))
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log_fh:
            proc = subprocess.run([sys.executable, str(bench_py), "_worker", str(job_path)],
                                  stdout=log_fh, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "error_type": "Timeout",
                "error_stage": "quantize", "worker_seconds": time.perf_counter() - t0, "notes": []}
    wall = time.perf_counter() - t0
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "worker_seconds": wall}
    return {"error": _crash_message(proc.returncode, log_path), "error_type": "WorkerCrash",
            "error_stage": "quantize", "worker_seconds": wall, "notes": [f"log: {log_path}"]}


def _crash_message(returncode: int, log_path: Path) -> str:
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return f"worker {how}: " + " | ".join(tail)


def saved_model(row: dict, out_dir: Path) -> Path:
    """The file of a bench row's quantized model: its model_path, which may be relative to
    the models/ folder of the bench output dir the row was read from."""
    path = Path(row["model_path"])
    return path if path.is_absolute() else out_dir / "models" / path
