#!/usr/bin/env python3
"""Quantize a float model over 2 GB end to end through the CLI, and report what it cost.

    python tools/big_model.py [--workdir DIR] [--gigabytes 2.2] [--width 4096] [--min-free-gb 12]

Builds a chain of bias-less MatMul + Relu layers (width x width, float32, seeded) whose
weights total --gigabytes, stored as external data in one file beside the model
(big.onnx, big.weights.bin), and a calibration file of 32 samples (calib.npz); then runs
``python -m onnx_lapq`` (this checkout's) on it at W8A8 and weight-only W4, each in a
subprocess of its own, and reports for each run:

- wall seconds and the subprocess's peak RSS (``ru_maxrss`` from wait4, which on Linux
  starts from this tool's own RSS at the spawn, printed beside it), also against the
  model's size on disk;
- the output's files (the model and any external data it names) and their sizes;
- that the output loads in ONNX Runtime (CPU, all optimizations) and runs on the
  calibration samples: output shape, all values finite;
- that the input model and its data file are byte for byte as before (sha256).

--workdir keeps every file there (default: a fresh temporary folder, removed at the end);
it must lie outside the repository.  The tool refuses to start with less than
--min-free-gb of available memory (MemAvailable).  Exit status 0 when both runs and all
checks pass, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 32
RUNS = {"W8A8": [], "weight-only W4": ["--weight-only", "--weight-bits", "4"]}
GB = 1e9


@dataclass
class Run:
    """One CLI run: what it cost, what it wrote, and the checks of its output."""

    name: str
    exit_code: int
    seconds: float
    peak_rss: int
    spawn_rss: int
    output_files: dict[str, int] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    failure: str | None = None


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def own_rss() -> int:
    """This process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


def build_model(folder: Path, gigabytes: float, width: int, seed: int) -> Path:
    """big.onnx with its weights in big.weights.bin, written one layer at a time."""
    layers = math.ceil(gigabytes * GB / (width * width * 4))
    rng = np.random.default_rng(seed)
    data = folder / "big.weights.bin"
    nodes, weights, x = [], [], "x"
    with open(data, "wb") as fh:
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32) * np.float32(math.sqrt(2.0 / width))  # He: stable through Relu
            weights.append(_external_tensor(f"w{i}", w.shape, data.name, fh.tell(), w.nbytes))
            fh.write(w.tobytes())
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"layer{i}"))
            x = f"mm{i}"
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
                x = f"relu{i}"
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnx_lapq tools/big_model.py")
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _external_tensor(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def model_files(path: Path) -> dict[str, int]:
    """The model file and each external data file it names, with their sizes in bytes."""
    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return {p.name: p.stat().st_size for p in [path] + [path.parent / n for n in sorted(names)]}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def quantize_cli(name: str, flags: list[str], model: Path, calib: Path, folder: Path, timeout: float) -> tuple[Run, Path]:
    """``python -m onnx_lapq`` in a subprocess, its stdout and stderr kept in files beside the output."""
    stem = name.lower().replace(" ", "_").replace("-", "_")
    out, log = folder / f"{stem}.onnx", folder / f"{stem}.log"
    argv = [sys.executable, "-m", "onnx_lapq", str(model), str(out), "--calib", str(calib), "--report", str(folder / f"{stem}.json"), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    spawn_rss = own_rss()
    started = time.perf_counter()
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2),
    ])
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - started > timeout:
            os.kill(pid, 15)
            done, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.2)
    run = Run(name, os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss << 10, spawn_rss)
    if run.exit_code != 0:
        run.failure = f"exit {run.exit_code}: " + " | ".join(log.read_text().strip().splitlines()[-3:])
    return run, out


def check_output(run: Run, out: Path, calib: Path) -> None:
    """The output's files, and that it loads in ONNX Runtime and gives finite outputs of the right shape."""
    run.output_files = model_files(out)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        run.failure = f"ONNX Runtime cannot load {out.name}: {str(exc).splitlines()[0]}"
        return
    x = np.load(calib)["x"]
    y = sess.run(None, {"x": x})[0]
    run.checks.append(f"loads in ONNX Runtime and runs: output {'x'.join(map(str, y.shape))} {y.dtype}, all finite: {bool(np.isfinite(y).all())}")
    if y.shape != x.shape or not np.isfinite(y).all():
        run.failure = f"the output of {out.name} is {y.shape}, finite: {bool(np.isfinite(y).all())}"


def report(run: Run, model_bytes: int) -> list[str]:
    lines = [
        f"{run.name}: exit {run.exit_code}, {run.seconds:.1f} s, peak RSS {run.peak_rss / GB:.2f} GB "
        f"({run.peak_rss / model_bytes:.2f}x the model's {model_bytes / GB:.2f} GB; this tool's own RSS at the spawn {run.spawn_rss / GB:.2f} GB)",
    ]
    if run.output_files:
        files = ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in run.output_files.items())
        lines.append(f"  output {sum(run.output_files.values()) / 1e6:.1f} MB: {files}")
    lines += [f"  {c}" for c in run.checks]
    if run.failure:
        lines.append(f"  FAILED: {run.failure}")
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temporary folder, removed at the end)")
    ap.add_argument("--gigabytes", type=float, default=2.2, help="float32 weights of the model, in GB (default 2.2)")
    ap.add_argument("--width", type=int, default=4096, help="rows and columns of each layer's weight (default 4096)")
    ap.add_argument("--min-free-gb", type=float, default=12.0, help="available memory needed to start (default 12)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds each quantization may take (default 3600)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if available_bytes() < a.min_free_gb * GB:
        ap.error(f"only {available_bytes() / GB:.1f} GB of memory available, under --min-free-gb {a.min_free_gb}: free some or lower it")
    if a.workdir is not None and a.workdir.resolve().is_relative_to(REPO):
        ap.error(f"--workdir {a.workdir} is inside the repository: choose a folder outside it")
    folder = a.workdir or Path(tempfile.mkdtemp(prefix="onnx_lapq_big_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return measure(folder, a)
    finally:
        if a.workdir is None:
            shutil.rmtree(folder)


def measure(folder: Path, a: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = build_model(folder, a.gigabytes, a.width, a.seed)
    calib = folder / "calib.npz"
    np.savez(calib, x=np.random.default_rng(a.seed).standard_normal((SAMPLES, a.width), dtype=np.float32))
    inputs = model_files(model)
    model_bytes = sum(inputs.values())
    print(f"built {model} in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{n} {s / GB:.3f} GB" for n, s in inputs.items()) + f"; {SAMPLES} calibration samples", flush=True)
    before = {n: sha256(folder / n) for n in inputs}
    failed = False
    for name, flags in RUNS.items():
        run, out = quantize_cli(name, flags, model, calib, folder, a.timeout)
        if run.failure is None:
            check_output(run, out, calib)
        print("\n".join(report(run, model_bytes)), flush=True)
        failed |= run.failure is not None
    after = {n: sha256(folder / n) for n in inputs}
    untouched = before == after and model_files(model) == inputs
    print(f"input {', '.join(inputs)}: {'untouched (sha256 before and after equal)' if untouched else 'CHANGED'}")
    return 0 if untouched and not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
