"""Latency of quantized models against their float model, measured interleaved in one process.

    python tools/latency.py FLOAT.onnx QUANT.onnx [QUANT2.onnx ...] [--batch 32] [--seq 128] [--reps 10] [--threads 2]

Inputs are random, shaped from the float model's first input dims: symbolic dims become
--batch (the first) and --seq (the others); integer inputs (token ids) are drawn from
[1000, 20000) and inputs whose name contains "mask" are all ones.  Each round runs every
model once on the same inputs; the median over rounds is reported, with the speed-up
(float ms / quantized ms).  Rounds alternate so that a busy machine slows all models alike.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in sess.get_inputs():
        dims = [d if isinstance(d, int) else None for d in value.shape]
        shape = [batch if i == 0 and d is None else (seq if d is None else d) for i, d in enumerate(dims)]
        if "int" in value.type:
            feeds[value.name] = np.ones(shape, np.int64) if "mask" in value.name.lower() else rng.integers(1000, 20000, shape).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model")
    parser.add_argument("quantized", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    paths = [args.float_model, *args.quantized]
    sessions = [session(p, args.threads) for p in paths]
    feeds = random_feeds(sessions[0], args.batch, args.seq)
    for sess in sessions:  # warm-up: first runs allocate and pre-pack weights
        sess.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(args.reps):
        for sess, bucket in zip(sessions, times):
            started = time.perf_counter()
            sess.run(None, feeds)
            bucket.append(time.perf_counter() - started)
    medians = [float(np.median(t)) * 1e3 for t in times]
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    print(f"inputs {shapes}, {args.threads} threads, median of {args.reps} interleaved rounds")
    for path, ms in zip(paths, medians):
        print(f"{path}: {ms:.1f} ms, speed-up {medians[0] / ms:.2f}x")


if __name__ == "__main__":
    main()
