#!/usr/bin/env python3
"""N:M masks at scale: time, kept magnitude and mask diversity of each mask family.

    python tools/nm_masks.py [--weights 25000000] [--patterns 2:4,4:8] [--seed 0]

For each N:M pattern, on a random heavy-tailed weight matrix (standard normal cubed, the
shape of trained weights' outliers) of about --weights entries, [rows, K] with rows and K
multiples of M: the seconds of the magnitude mask (plain N:M along K), of the exact
transposable mask and of the greedy approximation, each one's kept |w| as a fraction of the
whole, and the approximation's kept magnitude over the exact one's per M x M block (mean and
least).  Mask diversity: log10 of the masks each family allows per M x M block (plain:
C(M, N)^M; transposable with exactly N per row and column).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_lapq.nmmask import listed_exactly, magnitude_mask, parse_pattern, plain_count, transposable_count, transposable_mask  # noqa: E402


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _blocks(x: np.ndarray, m: int) -> np.ndarray:
    rows, k = x.shape
    return x.reshape(rows // m, m, k // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=int, default=25_000_000)
    parser.add_argument("--patterns", default="2:4,4:8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for text in args.patterns.split(","):
        n, m = parse_pattern(text)
        k = 1024 // m * m
        rows = max(m, args.weights // k // m * m)
        w = (rng.standard_normal((rows, k), dtype=np.float32) ** 3)
        total = float(np.abs(w).sum())
        plain, t_plain = _timed(lambda: magnitude_mask(w, n, m))
        approx, t_approx = _timed(lambda: transposable_mask(w, n, m, method="approx"))
        blocks = rows // m * (k // m)
        exact, t_exact = _timed(lambda: transposable_mask(w, n, m))
        how = "listed patterns" if listed_exactly(n, m) else "an assignment problem per block"
        print(f"{text} on a {rows} x {k} matrix ({rows * k / 1e6:.1f} M weights, {blocks} blocks of {m} x {m})")
        print(f"  magnitude N:M       {t_plain:7.2f} s  kept {np.abs(w[plain]).sum() / total:.4f} of |w|")
        print(f"  transposable exact  {t_exact:7.2f} s  kept {np.abs(w[exact]).sum() / total:.4f} ({how})")
        print(f"  transposable approx {t_approx:7.2f} s  kept {np.abs(w[approx]).sum() / total:.4f}")
        ratio = _blocks(np.abs(w) * approx, m).sum(axis=(1, 2)) / _blocks(np.abs(w) * exact, m).sum(axis=(1, 2))
        print(f"  approx / exact kept per block: mean {ratio.mean():.4f}, least {ratio.min():.4f}")
        print(f"  mask diversity per block (log10): plain {math.log10(plain_count(n, m)):.2f}, "
              f"transposable {math.log10(transposable_count(n, m)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
