"""What every method stage sees and returns: the run's context, the stage protocol, its record.

A stage declares the calibration statistics it needs (``observers``: tensor -> observer
kinds, which one streaming pass collects for all stages together) and whether it keeps
the calibration batches in memory (``keeps_batches``: a stage that evaluates the
end-to-end loss reads them many times).  ``run`` takes the :class:`RunContext` and the
Solution so far and returns a new Solution with a :class:`StageRecord` of what it did.
Stages that choose bit-widths run before those that choose ranges: the pipeline plans the
model again at the new widths, and ranges of the old plan would not fit it.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import onnx

from ..config import QuantConfig
from ..evaluator import LossEvaluator
from ..journal import SearchJournal
from ..observe import Observations
from ..params import QParams, SiteRanges, qparams
from ..plan import QuantPlan
from ..progress import Progress
from ..solution import Solution


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    """What a stage did, for the result and its report.

    start_ranges: the ranges a stage began its search from (None: it made no search); the
        report shows each site's scale there beside the final one."""

    stage: str
    start_ranges: SiteRanges | None = None

    def report(self) -> dict[str, Any]:
        """The entries this stage adds to the run's JSON report."""
        return {}

    def summary(self) -> str | None:
        """A line for the command line's summary, or None."""
        return None


@dataclass
class RunContext:
    """The run as the stages see it: the normalized float32 model, its plan and config, the
    observed statistics, the calibration batches (labels included) when a stage keeps them,
    progress, the journal, and the cleanup that runs when the run ends however it ends.

    ``evaluator`` is the loss evaluator a stage opened (:meth:`keep_evaluator`); the pipeline
    measures the exported model's loss with it."""

    model: onnx.ModelProto
    plan: QuantPlan
    config: QuantConfig
    stats: Observations | None
    batches: list[dict[str, np.ndarray]] | None
    notify: Callable[[Progress], None]
    journal: SearchJournal | None
    cleanup: ExitStack
    evaluator: LossEvaluator | None = field(default=None)

    def params(self, ranges: SiteRanges) -> dict[str, QParams]:
        """Scales and zero points of every site for ``ranges``, on the config's grids."""
        return qparams(self.plan, ranges, weight_symmetric=self.config.symmetric_weights, act_symmetric=self.config.act_symmetric)

    def keep_evaluator(self, evaluator: LossEvaluator, release: Callable[[], None]) -> None:
        """Make ``evaluator`` the run's, with ``release`` called when the run ends."""
        self.evaluator = evaluator
        self.cleanup.callback(release)


class Stage(Protocol):
    """A method as a stage of the run (see the module docstring)."""

    name: str
    keeps_batches: bool

    def observers(self, plan: QuantPlan, config: QuantConfig) -> Mapping[str, frozenset[str]]: ...

    def run(self, context: RunContext, solution: Solution) -> tuple[Solution, StageRecord]: ...
