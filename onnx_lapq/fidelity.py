"""How closely the exported model follows the float model on calibration samples, and a
warning with the likely remedies when it does not.

:func:`measure` runs the float model and the exported model's session once over the given
batches (the first calibration samples, see :func:`keep_head`) and returns a
:class:`Fidelity` of the first output: the run's loss (distance.py's distances; ``ce``, a
distance to labels rather than to the float model, reads as ``kl`` here), and, for a
classifier (distance.auto_loss's test of the graph), the share of samples whose top class is
the float model's, else the mean cosine similarity of the two outputs (sample by sample;
for one value per sample, of the whole column of values).
:func:`warn_if_poor` logs a warning naming the remedies most likely to help, in order,
when agreement falls below POOR_AGREEMENT or cosine below POOR_COSINE.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .runtime import session
from .config import QuantConfig
from .distance import auto_loss, distance, outputs_probabilities, resolve_loss

log = logging.getLogger(__name__)
KEPT_SAMPLES = 128  # calibration samples measured at most ...
KEPT_BYTES = 64 << 20  # ... and bytes of them kept (the first batch always)
POOR_AGREEMENT = 0.90
POOR_COSINE = 0.8


@dataclass(frozen=True)
class Fidelity:
    """The exported model against the float model on ``samples`` calibration samples:
    the mean ``loss`` of kind ``loss_kind``, and ``top1_agreement`` (a share, classifiers)
    or ``cosine`` (mean cosine similarity, other outputs)."""

    loss_kind: str
    loss: float
    samples: int
    top1_agreement: float | None = None
    cosine: float | None = None

    @property
    def poor(self) -> bool:
        if self.top1_agreement is not None:
            return self.top1_agreement < POOR_AGREEMENT
        return self.cosine < POOR_COSINE

    def as_report(self) -> dict[str, Any]:
        entry = {k: v for k, v in asdict(self).items() if v is not None}
        entry["poor"] = self.poor
        return entry


class _Head:
    """The first calibration samples, copied: up to KEPT_SAMPLES samples in at most KEPT_BYTES
    (the first batch whatever its size)."""

    def __init__(self, kept: list):
        self.kept, self.samples, self.size, self.full = kept, 0, 0, False

    def offer(self, batch: dict[str, np.ndarray]) -> None:
        """Keep what the head still takes of ``batch``; ``full`` once it takes no more."""
        if self.full:
            return
        head = {k: v[:KEPT_SAMPLES - self.samples] for k, v in batch.items()}
        head_bytes = sum(v.nbytes for v in head.values())
        if self.kept and self.size + head_bytes > KEPT_BYTES:
            self.full = True  # no more, so that the kept samples are the first ones
            return
        self.kept.append({k: v.copy() for k, v in head.items()})  # a view would hold the whole calibration file
        self.samples += len(next(iter(head.values())))
        self.size += head_bytes
        self.full = self.samples >= KEPT_SAMPLES


def keep_head(batches: Iterable[dict[str, np.ndarray]], kept: list) -> Iterator[dict[str, np.ndarray]]:
    """The batches, unchanged; copies of the first samples (see :class:`_Head`) are also
    appended to ``kept``."""
    head = _Head(kept)
    for batch in batches:
        head.offer(batch)
        yield batch


def head(batches: Iterable[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """What :func:`keep_head` keeps of ``batches``, reading no batch past the kept samples."""
    taken = _Head([])
    for batch in batches:
        taken.offer(batch)
        if taken.full:
            break
    return taken.kept


def measure(reference: onnx.ModelProto, exported: ort.InferenceSession, batches: list[dict[str, np.ndarray]], loss: str) -> Fidelity | None:
    """The fidelity of ``exported`` to the float model ``reference`` on ``batches``, with
    ``loss`` resolved as the search resolves it; None without batches."""
    if not batches:
        return None
    output = reference.graph.output[0].name
    fp32 = session(reference)
    pairs = [(fp32.run([output], b)[0], exported.run([output], b)[0]) for b in batches]
    kind = resolve_loss("kl" if loss == "ce" else loss, reference, [ref for ref, _ in pairs])
    probabilities = outputs_probabilities(reference)
    samples = sum(len(ref) for ref, _ in pairs)
    mean_loss = sum(float(distance(kind, ref, out, None, probabilities).sum()) for ref, out in pairs) / samples
    if auto_loss(reference) == "kl":  # a classifier
        agreeing = sum(int(np.sum(_top1(ref) == _top1(out))) for ref, out in pairs)
        return Fidelity(kind, mean_loss, samples, top1_agreement=agreeing / samples)
    if all(ref[0].size == 1 for ref, _ in pairs):  # one value per sample: the cosine of the whole column
        column = [np.concatenate([x.reshape(1, -1) for x in side], axis=1) for side in zip(*pairs)]
        return Fidelity(kind, mean_loss, samples, cosine=1.0 - float(distance("cosine", *column, None, False)[0]))
    dissimilarity = sum(float(distance("cosine", ref, out, None, False).sum()) for ref, out in pairs)
    return Fidelity(kind, mean_loss, samples, cosine=1.0 - dissimilarity / samples)


def _top1(outputs: np.ndarray) -> np.ndarray:
    return outputs.reshape(len(outputs), -1).argmax(axis=1)


def describe(entry: dict[str, Any]) -> str:
    """One line on a report's fidelity entry (:meth:`Fidelity.as_report`)."""
    line = f"fidelity on {entry['samples']} calibration samples: {_measured(entry)}"
    return line + (" (poor: see the warning)" if entry["poor"] else "")


def _measured(entry: dict[str, Any]) -> str:
    if "top1_agreement" in entry:
        measured = f"top-1 agrees with FP32 on {100 * entry['top1_agreement']:.1f}%"
    else:
        measured = f"mean cosine similarity to FP32 {entry['cosine']:.4f}"
    return f"{measured}, {entry['loss_kind']} loss {entry['loss']:.4g}"


def warn_if_poor(fidelity: Fidelity | None, config: QuantConfig, calibration_samples: int) -> None:
    """A warning with the likely remedies when ``fidelity`` is poor."""
    if fidelity is None or not fidelity.poor:
        return
    threshold = f"top-1 agreement below {POOR_AGREEMENT:.0%}" if fidelity.top1_agreement is not None else f"cosine below {POOR_COSINE}"
    log.warning(
        "the quantized model follows the float model poorly on %d calibration samples (%s; %s); likely remedies, in order: %s",
        fidelity.samples, _measured(fidelity.as_report()), threshold, "; ".join(remedies(config, calibration_samples)),
    )


def remedies(config: QuantConfig, calibration_samples: int) -> list[str]:
    """What to change in ``config`` for a closer model, the likeliest help first."""
    fixes = []
    if config.weight_only:
        if config.weight_bits < 8:
            fixes.append(f"more weight bits (--weight-bits {_more(config.weight_bits)})")
        if config.block_size > 16:
            fixes.append("smaller weight blocks (--block-size 16)")
        if config.method == "minmax":
            fixes.append("weights clipped for the least squared error (--method mse)")
    else:
        if config.method != "lapq":
            fixes.append("the loss-aware search (--method lapq)")
        if min(config.weight_bits, config.act_bits) < 8:
            fixes.append(f"more bits (--weight-bits {_more(config.weight_bits)} --act-bits {_more(config.act_bits)})")
            if not config.keep_first_last_8bit:
                fixes.append("8-bit first and last layers (--keep-first-last-8bit)")
    fixes.append("the most sensitive layers kept in float (--exclude NODE_NAME_PATTERN or OP_TYPE)")
    if not config.weight_only:
        fixes.append(f"more calibration samples (this run used {calibration_samples})")
    return fixes


def _more(bits: int) -> int:
    """The next bit-width to try: twice as many, up to 8."""
    return bits if bits >= 8 else min(2 * bits, 8)
