"""Inference measurements in the parent process: metric and interleaved latency.

Sessions: CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=threads,
inter_op_num_threads=1. Latency: both sessions run the same batch (32 items),
warmed up, then `reps` rounds alternating which model goes first; the median
per model, divided by the batch, is ms per item. FP32 and quantized are
therefore timed in the same minute of the same run, so their ratio holds on a
noisy machine even when the absolute figures drift.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

WARMUP = 2


def make_session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _time_once(sess: ort.InferenceSession, feed: dict) -> float:
    t0 = time.perf_counter()
    sess.run(None, feed)
    return time.perf_counter() - t0


def interleaved_ms_per_item(sess_a, sess_b, feed: dict, reps: int) -> tuple[float, float]:
    """(ms/item of sess_a, ms/item of sess_b), timed alternately on the same feed."""
    batch = len(next(iter(feed.values())))
    for _ in range(WARMUP):
        sess_a.run(None, feed)
        sess_b.run(None, feed)
    ta, tb = [], []
    for r in range(reps):
        if r % 2:
            tb.append(_time_once(sess_b, feed))
            ta.append(_time_once(sess_a, feed))
        else:
            ta.append(_time_once(sess_a, feed))
            tb.append(_time_once(sess_b, feed))
    return 1e3 * float(np.median(ta)) / batch, 1e3 * float(np.median(tb)) / batch
