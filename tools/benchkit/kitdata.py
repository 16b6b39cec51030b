"""Kit models, fixed seeded splits and metrics: one `Task` per kit model.

The kit's own eval.py / eval_sts.py (imported at run time from --kit, never
copied) define each model's preprocessing, labels and tokenizer. Splits, all
seeded with `np.random.default_rng(seed)`:

- ImageNet models: calibrate on `calib_size` images drawn from imagenet_eli1000;
  score top-1 on all 1300 images of imagenet_acuity1300.
- CIFAR-10 / MNIST: a seeded permutation of the 10,000 test images; the first
  `calib_size` calibrate, the rest are scored.
- all-MiniLM-L6-v2: calibrate on `calib_size` distinct STS-B dev sentences
  (padded to the longest of them, with attention_mask); score Spearman x100 of
  the cosine similarity on STS-B test (1379 pairs).
- quick: the scored set is a seeded subset (`QUICK_EVAL` items); calibration
  size is whatever the caller passes.

Top-1 splits ties: an item whose top score is shared by k classes counts 1/k if
its label is one of them (`top1_ties_split`), the accuracy a classifier has when it
breaks ties at random.  eval.py's `topk` ranks with `np.argsort`, whose order among
equal scores is an accident of the sort; models that quantize their logits or
probabilities (ONNX Runtime's quantize_static does) tie on 40-100 scored items at
W8A8, and the argsort's picks moved their top-1 by up to +0.40 points
(squeezenet1.1 ort-percentile: 73.00 by the argsort, 72.60 with ties split).
Rows keep the kit's figure as well (`kit_metric`).

Calibration samples are written once per (model, size, seed) as an .npz keyed
by input name (samples on axis 0), so every quantizer sees the same data.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

log = logging.getLogger(__name__)

TEXT_MODEL = "all-MiniLM-L6-v2"
TEXT_PATH = "models/text/all-MiniLM-L6-v2_fp32.onnx"
TEXT_TOKENIZER = "models/text/all-MiniLM-L6-v2_tokenizer"
QUICK_EVAL = {"imagenet": 200, "holdout": 500, "sts": 200}
LATENCY_BATCH = 32


@dataclass(frozen=True)
class Task:
    """What the benchmark needs of one model: its file, calibration data and scorer.

    ``outputs(sess)`` is the model's output on the scored items (class scores, or
    sentence embeddings: every first sentence of a pair, then every second), and
    ``score(outputs)`` the metric computed from them; ``kit_score(outputs)``, where
    given, is eval.py's own figure for the same outputs, and ``credit(outputs)``, where
    the metric is a mean over items (top-1), each item's share of it (0..1)."""

    model: str
    model_path: Path
    metric_name: str
    calib_npz: Path
    n_calib: int
    n_eval: int
    outputs: Callable[[object], np.ndarray]
    score: Callable[[np.ndarray], float]
    latency_feed: dict
    kit_score: Callable[[np.ndarray], float] | None = None
    credit: Callable[[np.ndarray], np.ndarray] | None = None  # per scored item, where the metric is their mean
    items: np.ndarray | None = None  # each scored item's index in its dataset, the same in every draw (vision)

    def evaluate(self, sess) -> float:
        """The metric of an ONNX Runtime session on the scored items."""
        return self.score(self.outputs(sess))


@lru_cache(maxsize=None)
def kit_module(kit: str, name: str):
    """Import eval.py or eval_sts.py from the kit folder (cached per process)."""
    path = Path(kit) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_onnx_lapq_kit_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kit_models(kit: Path) -> list[str]:
    """Every model of the kit, vision models in eval.py's order, then MiniLM."""
    return [*kit_module(str(kit), "eval").MODELS, TEXT_MODEL]


def model_path(kit: Path, model: str) -> Path:
    if model == TEXT_MODEL:
        return kit / TEXT_PATH
    return kit / kit_module(str(kit), "eval").MODELS[model]["path"]


def build_task(kit: Path, model: str, cache: Path, calib_size: int, quick: bool, seed: int) -> Task:
    """Load the scored split into memory and make sure the calibration npz exists."""
    if model == TEXT_MODEL:
        return _text_task(kit, cache, calib_size, quick, seed)
    return _vision_task(kit, model, cache, calib_size, quick, seed)


def describe_splits(calib_size: int, quick: bool, seed: int) -> list[str]:
    """The splits of a run, in words, for results.md."""
    def scored(key: str, n: int) -> str:
        return f"{QUICK_EVAL[key]} (seeded subset) of the {n}" if quick else f"all {n}"

    return [
        f"ImageNet models: calibrate on {calib_size} images of imagenet_eli1000 drawn with seed {seed}; "
        f"scored on {scored('imagenet', 1300)} images of imagenet_acuity1300.",
        f"CIFAR-10 / MNIST: seeded permutation (seed {seed}) of the 10,000 test images; the first {calib_size} "
        f"calibrate; scored on {scored('holdout', 10000 - calib_size)} others.",
        f"all-MiniLM-L6-v2: calibrate on {calib_size} distinct STS-B dev sentences (seed {seed}, padded to "
        f"the longest, with attention_mask); Spearman x100 on {scored('sts', 1379)} STS-B test pairs.",
    ]


def calib_path(cache: Path, model: str, calib_size: int, seed: int) -> Path:
    return cache / f"calib__{model}__n{calib_size}__s{seed}.npz"


def _quick_subset(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of `idx` (sorted), independent of the calibration draw."""
    if len(idx) <= n:
        return idx
    return np.sort(np.random.default_rng([seed, 1]).choice(idx, n, replace=False))


def _check_size(calib_size: int, available: int, what: str) -> None:
    if not 0 < calib_size < available:
        raise ValueError(f"--calib-size {calib_size} must be between 1 and {available - 1} for {what}")


def _vision_task(kit: Path, model: str, cache: Path, calib_size: int, quick: bool, seed: int) -> Task:
    ev = kit_module(str(kit), "eval")
    spec = ev.MODELS[model]
    name = _input_names(model_path(kit, model))[0]
    npz = calib_path(cache, model, calib_size, seed)
    split = _imagenet_split if spec["data"][0] == "imagenet_eli1000" else _holdout_split
    x_eval, y_eval, x_cal, items = split(ev, kit, spec["data"][0], calib_size, quick, seed, need_calib=not npz.exists())
    if x_cal is not None:
        _save_calib(npz, {name: ev.preprocess(x_cal, spec)})
    x = ev.preprocess(x_eval, spec)

    def outputs(sess) -> np.ndarray:
        return ev.run_scores(sess, x, spec, batch=LATENCY_BATCH)

    def score(scores: np.ndarray) -> float:
        return 100.0 * top1_ties_split(scores, y_eval)

    def credit(scores: np.ndarray) -> np.ndarray:
        return top1_credit(scores, y_eval)

    def kit_score(scores: np.ndarray) -> float:
        return 100.0 * ev.topk(scores, y_eval, ks=(1,))["top1"]

    return Task(model, model_path(kit, model), "top1", npz, calib_size, len(y_eval), outputs, score,
                {name: x[:LATENCY_BATCH]}, kit_score, credit, items)


def top1_credit(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per item: 1 when its label alone has the top score, 1/k when k classes share the top
    score and the label is one of them, else 0."""
    scores = scores.reshape(len(scores), -1)
    top = scores == scores.max(axis=1, keepdims=True)
    return top[np.arange(len(labels)), labels] / top.sum(axis=1)


def top1_ties_split(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose label has the top score (``top1_credit``'s mean)."""
    return float(np.mean(top1_credit(scores, labels)))


def _imagenet_split(ev, kit: Path, _dataset: str, calib_size: int, quick: bool, seed: int, need_calib: bool):
    """(scored uint8 images, labels, calibration uint8 images or None, scored indices)."""
    x, y = ev.load_dataset(str(kit), "imagenet_acuity1300")
    idx = _quick_subset(np.arange(len(y)), QUICK_EVAL["imagenet"], seed) if quick else np.arange(len(y))
    x_cal = None
    if need_calib:
        x_pool, _ = ev.load_dataset(str(kit), "imagenet_eli1000")
        _check_size(calib_size, len(x_pool) + 1, "imagenet_eli1000")
        x_cal = x_pool[np.sort(np.random.default_rng(seed).choice(len(x_pool), calib_size, replace=False))]
    return x[idx], y[idx], x_cal, idx


def _holdout_split(ev, kit: Path, dataset: str, calib_size: int, quick: bool, seed: int, need_calib: bool):
    """(scored uint8 images, labels, calibration uint8 images or None, scored indices) from one test set."""
    x, y = ev.load_dataset(str(kit), dataset)
    _check_size(calib_size, len(y), dataset)
    perm = np.random.default_rng(seed).permutation(len(y))
    idx = np.sort(perm[calib_size:])
    if quick:
        idx = _quick_subset(idx, QUICK_EVAL["holdout"], seed)
    x_cal = x[np.sort(perm[:calib_size])] if need_calib else None
    return x[idx], y[idx], x_cal, idx


def _input_names(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def _save_calib(npz: Path, arrays: dict) -> None:
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)
    log.info("wrote %s (%d samples)", npz, len(next(iter(arrays.values()))))


def _text_task(kit: Path, cache: Path, calib_size: int, quick: bool, seed: int) -> Task:
    sts = kit_module(str(kit), "eval_sts")
    encode = sts.make_encoder(str(kit / TEXT_TOKENIZER))
    npz = calib_path(cache, TEXT_MODEL, calib_size, seed)
    if not npz.exists():
        dev = sts.read_sts(str(kit / "data" / "stsb" / "sts-dev.csv"))
        sentences = list(dict.fromkeys(s for _, a, b in dev for s in (a, b)))
        _check_size(calib_size, len(sentences) + 1, TEXT_MODEL)
        pick = np.sort(np.random.default_rng(seed).choice(len(sentences), calib_size, replace=False))
        _save_calib(npz, sts.batch_inputs([encode(sentences[i]) for i in pick]))
    pairs = sts.read_sts(str(kit / "data" / "stsb" / "sts-test.csv"))
    idx = np.arange(len(pairs))
    if quick:
        idx = _quick_subset(idx, QUICK_EVAL["sts"], seed)
    pairs = [pairs[i] for i in idx]
    gold = np.array([p[0] for p in pairs])
    ids_a = [encode(p[1]) for p in pairs]
    ids_b = [encode(p[2]) for p in pairs]

    def outputs(sess) -> np.ndarray:
        return np.concatenate([_embed(sess, sts, ids_a), _embed(sess, sts, ids_b)])

    def score(embeddings: np.ndarray) -> float:
        e1, e2 = np.split(embeddings, 2)
        cos = (e1 * e2).sum(1) / (np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1))
        return 100.0 * float(spearmanr(cos, gold).correlation)

    return Task(TEXT_MODEL, kit / TEXT_PATH, "spearman", npz, calib_size, len(pairs), outputs, score,
                sts.batch_inputs(ids_a[:LATENCY_BATCH]))


def _embed(sess, sts, id_lists: list) -> np.ndarray:
    """eval_sts.embed on pre-tokenized sentences (batches of 32, padded per batch)."""
    out = [sess.run(None, sts.batch_inputs(id_lists[i:i + LATENCY_BATCH]))[0]
           for i in range(0, len(id_lists), LATENCY_BATCH)]
    return np.concatenate(out)
