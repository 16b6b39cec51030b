"""The size/loss front of the allocations a mixed-precision run tried, as JSON and a plot.

``front_report(record)`` lists every allocation (its budget, size in the budget's unit and
as a fraction of the float32 weights', measured calibration loss, widths), marks those on the
Pareto front (no other is both smaller and of lower loss) and the one chosen.
``write_front(record, path)`` writes it atomically to ``path`` and, where matplotlib is
installed (the ``plot`` extra), the plot beside it with the suffix ``.png``.
"""
from __future__ import annotations

import io
import json
import logging
import os

from .modelio import save_bytes_atomic, save_text_atomic

log = logging.getLogger(__name__)
AXIS_LABELS = {  # the size axis in each budget's unit (MixedPrecisionRecord.unit)
    "bytes": "weight bytes / float32 weight bytes", "bits": "weight bits / 32", "bops": "bit operations / those with float32 weights",
}


def on_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (size, loss): whether no other point is at most as large and as lossy, and better in one."""
    return [not any(s <= size and l <= loss and (s, l) != (size, loss) for s, l in points) for size, loss in points]


def front_report(record) -> dict:
    """The JSON-ready front of a MixedPrecisionRecord (see the module docstring)."""
    trials = [t.report(record.float_bytes) for t in record.trials]
    for trial, front in zip(trials, on_front([(t.size, t.loss) for t in record.trials])):
        trial["on_front"] = front
        trial["chosen"] = trial["widths"] == record.widths
    return {"float_bytes": record.float_bytes, "unit": record.unit, "baseline_loss": record.baseline_loss, "bound": record.bound, "trials": trials}


def png_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".png"


def write_front(record, path: str) -> None:
    """``path`` (JSON) and, with matplotlib, its ``.png`` (see the module docstring)."""
    report = front_report(record)
    save_text_atomic(json.dumps(report, indent=1), path)
    try:
        import matplotlib
    except ImportError:
        log.warning("the plot of %s needs matplotlib: pip install 'onnx_lapq[plot]'", path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    trials = report["trials"]
    ax.scatter([t["size_fraction"] for t in trials], [t["loss"] for t in trials], c=["C3" if t["chosen"] else "C0" for t in trials])
    front = sorted((t["size_fraction"], t["loss"]) for t in trials if t["on_front"])
    ax.plot(*zip(*front), color="C0", linewidth=1)
    ax.axhline(report["baseline_loss"], color="grey", linestyle=":", label="every layer at the widest width")
    if report["bound"] is not None:
        ax.axhline(report["bound"], color="C3", linestyle="--", label="loss bound")
    ax.set_xlabel(AXIS_LABELS[report["unit"]])
    ax.set_ylabel("calibration loss")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    save_bytes_atomic(buffer.getvalue(), png_path(path))
