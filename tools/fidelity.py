"""How closely quantized kit models follow their FP32 original, on the bench's scored split.

    python tools/fidelity.py --kit ../shared/kit --model cifar10_resnet20 A.onnx B.onnx ...

For each file it prints the bench's metric and two measures taken item by item against
the FP32 model's own outputs, which vary far less between two quantized models than the
metric does (a quantized model that is "right" where FP32 is wrong scores a point for
luck, not for fidelity):

- classifiers: ``agree``, the share of items whose top-1 class is FP32's (percent), and
  ``kl``, the mean KL(FP32 || quantized) of the class distributions (the softmax of the
  scores, or the scores themselves where the model already outputs probabilities);
- all-MiniLM-L6-v2: ``cosine``, the mean cosine similarity of each sentence embedding
  with FP32's.

Same splits, preprocessing and ONNX Runtime settings as tools/bench.py (seed 0, 256
calibration samples unless given).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import kitdata, measure  # noqa: E402


def log_probabilities(scores: np.ndarray) -> np.ndarray:
    """Log class probabilities of a [items, classes] score array (probabilities kept as they are)."""
    scores = np.asarray(scores, np.float64)
    if np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.maximum(scores, 1e-12))
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def classifier_fidelity(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (percent) and mean KL(reference || quantized) of two score arrays."""
    log_p, log_q = log_probabilities(reference), log_probabilities(quantized)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    return {"agree": 100.0 * float(np.mean(reference.argmax(1) == quantized.argmax(1))), "kl": float(np.mean(kl))}


def embedding_fidelity(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """Mean cosine similarity of matching rows."""
    cos = np.sum(reference * quantized, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1))
    return {"cosine": float(np.mean(cos))}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kit", type=Path, required=True, help="the benchmark kit (../shared/kit)")
    ap.add_argument("--model", required=True, help="kit model the files quantize, e.g. cifar10_resnet20")
    ap.add_argument("files", nargs="+", type=Path, help="quantized ONNX models of that kit model")
    ap.add_argument("--calib-size", type=int, default=256, help="calibration samples the bench held out (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.model not in kitdata.kit_models(a.kit):
        ap.error(f"--model {a.model!r} is not a kit model: choose one of {', '.join(kitdata.kit_models(a.kit))}")
    with tempfile.TemporaryDirectory() as cache:
        task = kitdata.build_task(a.kit, a.model, Path(cache), a.calib_size, False, a.seed)
    fidelity = embedding_fidelity if a.model == kitdata.TEXT_MODEL else classifier_fidelity
    fp32 = measure.make_session(str(task.model_path), a.threads)
    reference = task.outputs(fp32)
    print(f"{a.model}: FP32 {task.metric_name} {task.score(reference):.2f} on {task.n_eval} items")
    for path in a.files:
        outputs = task.outputs(measure.make_session(str(path), a.threads))
        measures = " ".join(f"{k} {v:.4f}" for k, v in fidelity(reference, outputs).items())
        print(f"{path}: {task.metric_name} {task.score(outputs):.2f} {measures}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
