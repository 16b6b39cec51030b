"""Options of mixed precision (methods/mixed.py): the candidate widths, the budget, the probes.

Exactly one budget: a size (``target_size``, ``target_bits``), a compute budget
(``target_bops``) or an accuracy bound
(``max_loss_increase``, ``max_loss_ratio``) under which the stage bisects over the size.
Checked like every options class (options.check_types, one-line ConfigError messages).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .executor import check_spec
from .options import check_types

SENSITIVITIES = ("measured", "proxy")
BUDGETS = ("target_size", "target_bits", "target_bops", "max_loss_increase", "max_loss_ratio")


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionOptions:
    """Per-layer weight widths under a budget (methods/mixed.py).

    candidate_bits: the candidate weight widths (e.g. (2, 3, 4, 8)); empty: every layer at the
        config's weight_bits.  The config's weight_bits must be the widest of them.
    candidate_act_bits: the candidate widths of each layer's input activation (e.g. (4, 8)),
        chosen with the weights' under ``target_bops`` (the one budget that counts activation
        bits); empty: every input at the config's act_bits, which must be the widest of them.
    target_size: the budget as a fraction of the float32 weights' bytes (e.g. 0.125).
    target_bits: the budget as average bits per weight (e.g. 3.5).
    target_bops: the budget as a fraction of the bit operations (MACs × weight bits × input
        bits, bops.py) of the model with float32 weights at the plan's activation widths
        (e.g. 0.125: 4-bit weights on average over the multiply-accumulates).
    max_loss_increase: an accuracy bound: the smallest model whose calibration loss exceeds
        that of every layer at the widest candidate by at most this much.
    max_loss_ratio: the same bound as a multiple of that loss (e.g. 1.5).  Exactly one of the five.
    interactions: also measure how graph neighbours' errors interact, as pair terms of the
        allocation (more probes: three per pair of neighbouring layers).
    sensitivity: "measured" (a probe per layer and width) or "proxy" (one random-noise probe
        per layer, scaled by each width's rounding error: noiseprobe.py; rounding to nearest).
    executor: where the probes run: "inline", "local" (worker processes, one per core),
        "local:N", "ray", "ray:ADDRESS" or "ray://HOST:PORT" (executor.py).
    """

    candidate_bits: tuple[int, ...] = ()
    candidate_act_bits: tuple[int, ...] = ()
    target_size: float | None = None
    target_bits: float | None = None
    target_bops: float | None = None
    max_loss_increase: float | None = None
    max_loss_ratio: float | None = None
    interactions: bool = False
    sensitivity: str = "measured"
    executor: str = "local"

    def __post_init__(self) -> None:
        check_types(self)
        check_spec(self.executor)
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity={self.sensitivity!r} is unknown: use {' or '.join(SENSITIVITIES)}")
        budgets = sum(getattr(self, b) is not None for b in BUDGETS)
        if not self.allocates and budgets:
            raise ConfigError("a budget needs candidate widths: give candidate_bits, e.g. (2, 3, 4, 8)")
        if self.candidate_bits and len(set(self.candidate_bits)) < 2:
            raise ConfigError(f"candidate_bits={self.candidate_bits} needs at least two widths, e.g. (2, 4, 8)")
        if self.candidate_act_bits and len(set(self.candidate_act_bits)) < 2:
            raise ConfigError(f"candidate_act_bits={self.candidate_act_bits} needs at least two widths, e.g. (4, 8)")
        if self.candidate_act_bits and budgets == 1 and self.target_bops is None:
            raise ConfigError("candidate_act_bits need a compute budget, target_bops (MACs x weight bits x input bits): "
                              "a size or loss budget counts the weights only")
        if self.allocates and budgets != 1:
            raise ConfigError("mixed precision needs one budget: target_size (a fraction of the float weights' bytes), target_bits (average bits), "
                              "target_bops (a fraction of the bit operations with float weights), "
                              "max_loss_increase or max_loss_ratio (a bound on the calibration loss)")
        if self.target_size is not None and not 0.0 < self.target_size <= 1.0:
            raise ConfigError(f"target_size={self.target_size} must be a fraction in (0, 1], e.g. 0.125")
        if self.target_bops is not None and not 0.0 < self.target_bops <= 1.0:
            raise ConfigError(f"target_bops={self.target_bops} must be a fraction in (0, 1], e.g. 0.125")
        if self.target_bits is not None and not 0.0 < self.target_bits <= 32.0:
            raise ConfigError(f"target_bits={self.target_bits} must be average bits in (0, 32], e.g. 3.5")
        if self.max_loss_increase is not None and self.max_loss_increase < 0:
            raise ConfigError(f"max_loss_increase={self.max_loss_increase} is below what any allocation meets (every layer at the widest "
                              "candidate increases the loss by 0): give at least 0")
        if self.max_loss_ratio is not None and self.max_loss_ratio < 1:
            raise ConfigError(f"max_loss_ratio={self.max_loss_ratio} is below what any allocation meets (every layer at the widest "
                              "candidate has the ratio 1): give at least 1")

    @property
    def allocates(self) -> bool:
        """Whether the stage runs: candidate weight or activation widths are given."""
        return bool(self.candidate_bits or self.candidate_act_bits)

    @property
    def bounded(self) -> bool:
        """Whether the budget is an accuracy bound (the stage bisects over the size)."""
        return self.max_loss_increase is not None or self.max_loss_ratio is not None
