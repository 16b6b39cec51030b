"""What a LAPQ stage reports: its start, its search, its evaluator and bias correction's race."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .base import StageRecord
from .lapq_search import LapqOutcome


@dataclass(frozen=True)
class EvaluatorRecord:
    """How the loss evaluator ran: fused or fed graphs, its cuts, the mean share of the graph
    an evaluation ran, the seconds of one FP32 pass and one evaluation's cost over it."""

    mode: str
    cuts: int
    mean_suffix_fraction: float
    fp32_pass_seconds: float
    cost_ratio: float


def evaluator_record(evaluator) -> EvaluatorRecord:
    """The :class:`EvaluatorRecord` of a LossEvaluator after its evaluations."""
    return EvaluatorRecord(
        mode="fused" if evaluator.fused else "fed", cuts=len(evaluator.cuts) - 1,
        mean_suffix_fraction=round(evaluator.mean_suffix_fraction, 3), fp32_pass_seconds=round(evaluator.fp32_seconds, 4),
        cost_ratio=round(evaluator.cost_ratio, 3),
    )


@dataclass(frozen=True)
class RaceRecord:
    """Bias correction's race: each side's final loss, whether correction was kept, and the
    evaluations and seconds the race used."""

    on: float
    off: float
    kept: bool
    evaluations: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class LapqRecord(StageRecord):
    """A LAPQ stage's start and search (``outcome``), the loss it minimized, its evaluator,
    whether bias correction stayed on, the race if one ran, and the evaluations a resumed
    run replayed from its journal (None without a journal)."""

    outcome: LapqOutcome
    loss: str
    evaluator: EvaluatorRecord
    bias_correction: bool
    race: RaceRecord | None = None
    replayed_evaluations: int | None = None

    def report(self) -> dict[str, Any]:
        outcome, search = self.outcome, self.outcome.search
        entries = {
            "loss": self.loss,
            "start": outcome.start,
            "p_star": outcome.p_star,
            "p_losses": {str(p): v for p, v in outcome.p_losses.items()},
            "start_losses": outcome.start_losses,
            "init_loss": outcome.init_loss,
            "final_loss": search.fun,
            "nfev": search.nfev,
            "nit": search.nit,
            "search_message": search.message,
            "search_seconds": round(search.seconds, 3),
            "loss_trace": [[n, v] for n, v in search.trace],
            "evaluator": asdict(self.evaluator),
            "bias_correction": self.bias_correction,
        }
        if self.race is not None:
            entries["bias_correction_race"] = asdict(self.race)
        if self.replayed_evaluations is not None:
            entries["replayed_evaluations"] = self.replayed_evaluations
        return entries

    def summary(self) -> str:
        outcome = self.outcome
        start = f"{outcome.start} start" if outcome.p_star is None else f"Lp start (p*={outcome.p_star:.2f})"
        return f"{self.loss} loss: {start} {outcome.init_loss:.4g} -> searched {outcome.search.fun:.4g} in {outcome.search.nfev} evaluations"
