"""Paired comparison of two methods' bench models, item by item, over one or more calibration draws.

    python tools/paired.py --kit ../shared/kit --results DIR [DIR ...] --model cifar10_resnet20 \
        --config w8a8 --method lapq [--against ort-minmax,ort-entropy,ort-percentile,fp32] [--seeds 0,1,2,3,4]

A top-1 gap of a few items says little by itself: two W8A8 models of one network
can disagree on a hundred or more scored items, and which of them gains there is close to
a coin flip.  For each seed (one calibration draw and its scored split, as
tools/bench.py makes them) this scores the saved models of ``--method`` and of each
``--against`` method (``fp32``: the float model) on the same items and counts the items
where ``--method`` earns more top-1 credit (``wins``) and less (``losses``; credit as the
bench's top-1: 1/k for a k-way tie at the top); ``p`` is the exact two-sided sign test
of wins against losses.  ``best`` is, per seed, the ONNX Runtime method (``ort-*``) among ``--against``
with the highest top-1 (the bench's "best ORT"; chosen after scoring, so it favours that side).  The
last lines pool every seed by item: draws score mostly the same items (CIFAR-10 and MNIST draws
9,744 of the same 10,000 test images, ImageNet draws all 1,300), and an item that one method
gets right in every draw would otherwise count once per draw, so each item counts once, with
its credit differences summed over the draws it is scored in.

Models come from the rows of the bench's results.json in each DIR (later DIRs win, as with
``bench.py --merge``), made with the calibration size given here and not --quick.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the onnx_lapq of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import kitdata, measure, runners  # noqa: E402

FP32 = "fp32"
BEST = "best"


@dataclass(frozen=True)
class Paired:
    """Items where the first model earns more top-1 credit than the second, and fewer."""

    wins: int
    losses: int
    net: float  # credit of the first minus the second, in items

    @property
    def p(self) -> float:
        """Exact two-sided sign test of wins against losses (1.0 when they never differ)."""
        n = self.wins + self.losses
        return 1.0 if n == 0 else float(binomtest(self.wins, n, 0.5).pvalue)


def paired(credit_a: np.ndarray, credit_b: np.ndarray, items: np.ndarray | None = None) -> Paired:
    """Compare two models' per-item credits on the same items; with ``items`` (an id per
    credit), the credits of an id are summed first, so that an id counts once."""
    diff = np.asarray(credit_a, np.float64) - np.asarray(credit_b, np.float64)
    if items is not None:
        _, which = np.unique(items, return_inverse=True)
        diff = np.round(np.bincount(which, weights=diff), 9)  # credits are sums of 1/k: rounding drops float dust
    return Paired(int(np.sum(diff > 0)), int(np.sum(diff < 0)), float(diff.sum()))


def bench_models(dirs: list[Path], model: str, config: str, calib_size: int) -> dict[tuple[str, int], Path]:
    """(method, seed) -> saved model of the finished rows of ``model`` and ``config`` in the dirs."""
    found = {}
    for d in dirs:
        for row in json.loads((d / "results.json").read_text()):
            if (row["model"], row["config"], row["quick"], row["calib_size"]) != (model, config, False, calib_size):
                continue
            if row.get("error") or not row.get("model_path"):
                continue
            found[(row["method"], row["seed"])] = runners.saved_model(row, d)
    return found


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", type=Path, required=True, help="the benchmark kit (../shared/kit)")
    ap.add_argument("--results", type=Path, nargs="+", required=True, metavar="DIR", help="tools/bench.py --out dirs")
    ap.add_argument("--model", required=True, help="kit model, e.g. cifar10_resnet20 (top-1 models only)")
    ap.add_argument("--config", required=True, help="bench config, e.g. w8a8")
    ap.add_argument("--method", required=True, help="the method compared, e.g. lapq")
    ap.add_argument("--against", default="ort-minmax,ort-entropy,ort-percentile", help=f"comma-separated methods ({FP32}: the float model)")
    ap.add_argument("--seeds", default="0", help="comma-separated bench seeds (calibration draws)")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.model not in kitdata.kit_models(a.kit):
        ap.error(f"--model {a.model!r} is not a kit model: choose one of {', '.join(kitdata.kit_models(a.kit))}")
    if a.model == kitdata.TEXT_MODEL:
        ap.error(f"{a.model} is scored by Spearman over all pairs, which has no per-item credit: choose a top-1 model")
    against = a.against.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    saved = bench_models(a.results, a.model, a.config, a.calib_size)
    missing = [f"{m} seed {s}" for s in seeds for m in [a.method, *against] if m != FP32 and (m, s) not in saved]
    if missing:
        ap.error(f"no finished bench row for {', '.join(missing)} ({a.model} {a.config}) in {' '.join(map(str, a.results))}: run tools/bench.py for them first")

    draws = []  # per seed: (scored items, method -> credit per item, with BEST for that seed's best ORT method)
    print(f"{a.model} {a.config}: {a.method} against each method, per seed: top-1 of both, items {a.method} wins / loses, net items, sign-test p")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as cache:
            task = kitdata.build_task(a.kit, a.model, Path(cache), a.calib_size, False, seed)
        credits = {}
        for method in [a.method, *against]:
            path = task.model_path if method == FP32 else saved[(method, seed)]
            credits[method] = task.credit(task.outputs(measure.make_session(str(path), a.threads)))
        ort = [m for m in against if runners.tool_of(m) == "ort"]
        best = max(ort, key=lambda m: credits[m].mean()) if ort else None
        compared = [*against, *([BEST] if best else [])]
        if best:
            credits[BEST] = credits[best]
        for name in compared:
            result = paired(credits[a.method], credits[name])
            label = f"{BEST} ({best})" if name == BEST else name
            print(f"  seed {seed} vs {label}: {100 * credits[a.method].mean():.2f} against {100 * credits[name].mean():.2f}, "
                  f"+{result.wins} / -{result.losses}, net {result.net:+.1f}, p {result.p:.3f}", flush=True)
        draws.append((task.items, credits))
    items = np.concatenate([scored for scored, _ in draws])
    for name in compared:
        mine, theirs = (np.concatenate([credits[m] for _, credits in draws]) for m in (a.method, name))
        result = paired(mine, theirs, items)
        print(f"  all {len(seeds)} seeds vs {name}, items counted once: +{result.wins} / -{result.losses}, "
              f"net {result.net:+.1f}, p {result.p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
