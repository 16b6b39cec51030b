"""How closely quantized kit models follow their FP32 original, on the bench's scored split.

    python tools/fidelity.py --kit ../shared/kit --model cifar10_resnet20 A.onnx B.onnx ...

For each file it prints the bench's metric and two measures taken item by item against
the FP32 model's own outputs, which vary far less between two quantized models than the
metric does (a quantized model that is "right" where FP32 is wrong scores a point for
luck, not for fidelity):

- classifiers: ``agree``, the share of items whose top-1 class is FP32's (percent), and
  ``kl``, the mean KL(FP32 || quantized) of the class distributions, computed as LAPQ's
  loss does (the softmax of the scores, or the scores themselves where the FP32 graph
  ends in a Softmax; a quantized probability of exactly 0 counts as 1e-12);
- all-MiniLM-L6-v2: ``cosine``, the mean cosine similarity of each sentence embedding
  with FP32's.

Same splits, preprocessing and ONNX Runtime settings as tools/bench.py (seed 0, 256
calibration samples unless given).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the onnx_lapq of this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import kitdata, measure  # noqa: E402
from onnx_lapq.distance import distance, outputs_probabilities  # noqa: E402


def classifier_fidelity(reference: np.ndarray, quantized: np.ndarray, probabilities: bool) -> dict[str, float]:
    """Top-1 agreement (percent) and mean KL(reference || quantized), as the LAPQ loss computes it."""
    agree = 100.0 * float(np.mean(reference.argmax(1) == quantized.argmax(1)))
    return {"agree": agree, "kl": float(np.mean(distance("kl", reference, quantized, None, probabilities)))}


def embedding_fidelity(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """Mean cosine similarity of matching rows."""
    return {"cosine": 1.0 - float(np.mean(distance("cosine", reference, quantized, None, False)))}


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
    if a.model == kitdata.TEXT_MODEL:
        fidelity = embedding_fidelity
    else:
        probabilities = outputs_probabilities(onnx.load(str(task.model_path), load_external_data=False))
        fidelity = partial(classifier_fidelity, probabilities=probabilities)
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
