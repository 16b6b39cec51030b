"""Options of the methods, one frozen dataclass per method, and the type check they share.

Each option and its default is stated once, here: the CLI takes its defaults from these
classes.  Every class checks its values in ``__post_init__`` and raises :class:`ConfigError`
with a message that says how to fix the value; :func:`check_types` checks each field against
its annotation first, so a wrong type never reaches a range check.
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass, fields

import numpy as np

from .bits import LayerBits
from .errors import ConfigError
from .nmmask import MASKS, parse_pattern

CALIBRATORS = ("minmax", "percentile", "entropy", "mse", "lp")  # per-tensor clipping methods (CalibrationOptions)
SEARCHES = ("powell", "coordinate")
LOSSES = ("auto", "kl", "mse", "cosine", "ce")
SEARCH_BIAS_CORRECTION = ("auto", "on", "off", "race")
WEIGHT_METHODS = ("auto", "nearest", "gptq", "adaround")  # how weights are rounded: to nearest, or by a reconstruction solver
# what weights="auto" runs where a layer's weights are narrower than 8 bits: adaround on a model
# with convolutions among its reconstructed layers, gptq on one of Gemm/MatMul layers only
# (transformers), where the bench measured learned rounding below gptq
AUTO_RECONSTRUCTION = {"convolutional": "adaround", "linear": "gptq"}
CONVOLUTIONS = ("Conv", "ConvTranspose")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and bool(np.isfinite(value))


# annotation -> (does a value fit, what the message asks for)
_TYPES = {
    "int": (_is_int, "an int"),
    "int | None": (lambda v: v is None or _is_int(v), "an int or None"),
    "float": (_is_number, "a finite number"),
    "float | None": (lambda v: v is None or _is_number(v), "a finite number or None"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "bool | None": (lambda v: v is None or isinstance(v, bool), "True, False or None"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "tuple[str, ...]": (lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v), "a tuple of strings"),
    "tuple[float, ...]": (lambda v: isinstance(v, tuple) and all(_is_number(x) for x in v), "a tuple of numbers"),
    "tuple[int, ...]": (lambda v: isinstance(v, tuple) and all(_is_int(x) for x in v), "a tuple of ints"),
    "tuple[LayerBits, ...]": (lambda v: isinstance(v, tuple) and all(isinstance(x, LayerBits) for x in v), "a tuple of LayerBits"),
}


def check_patterns(field: str, patterns: tuple[str, ...]) -> None:
    """ConfigError naming the first of ``patterns`` (regular expressions of node names) that is not one."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{field} pattern {pattern!r} is not a valid regular expression ({exc}): fix or quote it") from None


def checked_types() -> tuple[str, ...]:
    """The annotations :func:`check_types` checks (besides nested options dataclasses)."""
    return tuple(_TYPES)


def check_types(options) -> None:
    """ConfigError naming the first field of a dataclass whose value does not fit its
    annotation; lists given for tuple fields become tuples first (frozen fields must hash)."""
    hints = typing.get_type_hints(type(options))
    for field in fields(options):
        value = getattr(options, field.name)
        kind = field.type if isinstance(field.type, str) else str(field.type)
        if kind.startswith("tuple[") and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(options, field.name, value)
        if kind == "tuple[str, ...]" and isinstance(value, str):
            raise ConfigError(f"{field.name} must be a tuple of strings, not one string: write {field.name}=({value!r},)")
        if kind in _TYPES:
            fits, wanted = _TYPES[kind]
        else:  # a nested options dataclass
            wanted_type = hints[field.name]
            fits, wanted = (lambda v, t=wanted_type: isinstance(v, t)), f"an onnx_lapq.{wanted_type.__name__}"
        if not fits(value):
            raise ConfigError(f"{field.name}={value!r} must be {wanted}")


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """Options of the per-tensor calibrators (methods/calibrators.py).

    percentile: the percentile method clips at this percentile of the values.
    lp_norm: the lp method's p (the clip minimizing E|Q(x) - x|^p).
    histogram_bins: bins of each activation's streamed histogram (a power of two).
    """

    percentile: float = 99.999
    lp_norm: float = 2.4
    histogram_bins: int = 4096

    def __post_init__(self) -> None:
        check_types(self)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (50, 100], e.g. 99.999")
        if not 0.5 <= self.lp_norm <= 8.0:
            raise ConfigError(f"lp_norm={self.lp_norm} must be in [0.5, 8], e.g. 2.4")
        if self.histogram_bins not in tuple(2**k for k in range(8, 17)):
            raise ConfigError(f"histogram_bins={self.histogram_bins} must be a power of two from 256 to 65536")


@dataclass(frozen=True, kw_only=True)
class LapqOptions:
    """Options of LAPQ's start and joint search (methods/lapq.py).

    lp_grid: the p values of the Lp initialization sweep.
    search: "powell" (scipy's, over all coordinates) or "coordinate" (one at a time).
    max_evals, time_limit: search budgets (loss evaluations, seconds; None = none);
        the best point seen is kept when a budget stops the search.  max_evals bounds the
        search's own evaluations; the start candidates (the Lp sweep and the calibrators,
        once per side of a bias-correction race) come on top.  time_limit covers the start
        candidates and the search (a start always completes).
    search_iterations: Powell iterations / coordinate sweeps (at most; the budgets
        usually stop the search first).
    search_step: the search moves each log clip factor on a lattice of this step
        (0.01: 1% of a clip) and evaluates each lattice point once; below about 1%
        the calibration loss changes by rounding noise alone.  0: no lattice.
    loss: the objective: auto (kl for classifiers, cosine for normalized embeddings,
        else mse), kl, mse, cosine, or ce (cross-entropy against the calibration labels,
        which QuantConfig.label_key names).
    memory_budget_mb: cached activations the loss evaluator may keep.
    search_samples: the loss is evaluated on a seeded random subset of this many
        calibration samples (None: all); statistics always use every sample.
    search_bias_correction: whether the search keeps bias correction (when it is on):
        "race" searches both ways with a quarter of ``max_evals`` (and of ``time_limit``)
        each and spends the rest continuing the one with the lower loss; "auto" keeps it
        only where it more than halves the loss of the min/max start; "on" and "off"
        decide for every network.
    """

    lp_grid: tuple[float, ...] = (2.0, 2.5, 3.0, 3.5, 4.0)
    search: str = "powell"
    max_evals: int = 1000
    time_limit: float | None = None
    search_iterations: int = 10
    search_step: float = 0.01
    loss: str = "auto"
    memory_budget_mb: int = 1024
    search_samples: int | None = None
    search_bias_correction: str = "race"

    def __post_init__(self) -> None:
        check_types(self)
        if self.search not in SEARCHES:
            raise ConfigError(f"search={self.search!r} is unknown: use one of {', '.join(SEARCHES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is unknown: use one of {', '.join(LOSSES)}")
        if self.search_bias_correction not in SEARCH_BIAS_CORRECTION:
            raise ConfigError(f"search_bias_correction={self.search_bias_correction!r} is unknown: use one of {', '.join(SEARCH_BIAS_CORRECTION)}")
        for field in ("max_evals", "search_iterations"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field}={getattr(self, field)} must be at least 1")
        if not 0.0 <= self.search_step <= 0.5:
            raise ConfigError(f"search_step={self.search_step} must be in [0, 0.5] (a log clip factor; 0.01 is 1% of a clip, 0 searches without a lattice)")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ConfigError(f"time_limit={self.time_limit} must be positive seconds (or None for no limit)")
        if len(self.lp_grid) < 1 or any(not 0.5 <= p <= 8.0 for p in self.lp_grid):
            raise ConfigError("lp_grid must hold p values in [0.5, 8], e.g. (2, 2.5, 3, 3.5, 4)")
        if self.search_samples is not None and self.search_samples < 1:
            raise ConfigError(f"search_samples={self.search_samples} must be at least 1 (or None for all)")
        if self.memory_budget_mb < 0:
            raise ConfigError("memory_budget_mb must be >= 0")


@dataclass(frozen=True, kw_only=True)
class SparsityOptions:
    """N:M sparsity of the layers' weights (methods/sparsify.py; masks in nmmask.py).

    pattern: "N:M" (e.g. "2:4": at most 2 non-zeros in every 4 consecutive weights along
        the reduction dimension, input channels innermost for convolutions), or None: dense.
    masks: "magnitude" (the N largest |w| of every run), "transposable" (at most N per row
        and per column of every M × M tile, the best such mask), or "transposable-approx"
        (the greedy 2-approximation of it).
    dense_first_last: keep the first and last layers dense.
    dense_layers: regular expressions of layer names kept dense.
    repair: re-fit each layer's kept weights, front to back, so that its output on its inputs
        in the model pruned so far matches the dense layer's (masked least squares), then
        set its bias so that its mean output matches too.
    repair_damping: added to the diagonal of the repair's Gram matrices, as a fraction of its mean.
    """

    pattern: str | None = None
    masks: str = "magnitude"
    dense_first_last: bool = True
    dense_layers: tuple[str, ...] = ()
    repair: bool = True
    repair_damping: float = 0.01

    def __post_init__(self) -> None:
        check_types(self)
        if self.pattern is not None:
            parse_pattern(self.pattern)
        if self.masks not in MASKS:
            raise ConfigError(f"sparsity masks={self.masks!r} are unknown: use one of {', '.join(MASKS)}")
        check_patterns("dense_layers", self.dense_layers)
        if not 0.0 < self.repair_damping <= 1.0:
            raise ConfigError(f"repair_damping={self.repair_damping} must be in (0, 1], e.g. 0.01")

    def pattern_nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)


@dataclass(frozen=True, kw_only=True)
class ReconstructionOptions:
    """Options of layer-wise weight reconstruction (methods/reconstruction.py).

    weight_clipping: how each weight's grid is chosen before its rounding: mse or lp (the
        range minimizing the weight's own error) or minmax.
    max_columns: input patches sampled per layer for its Gram statistics (all where fewer;
        at most 1024 per column of the layer's patch).
    cache_budget_mb: memory for the activations kept between waves of layers, so that each
        wave runs only its part of the model (layerinputs.py).
    statistics_correction: set each reconstructed layer's bias so that its mean output
        matches the float model's.
    qdrop: the probability that an element of a layer's input comes from the float model
        instead of the quantized one in its objective (QDrop); 0: always the quantized one.
    damping: added to the diagonal of each Gram matrix, as a fraction of its mean.
    act_order: gptq rounds the columns of largest input energy first.
    block: columns per lazy update of gptq.
    iterations: Adam steps of adaround's learned rounding.
    regularization: weight of adaround's push of each rounding to up or down (λ).
    held_out: every held_out-th entry of each layer's input along its first dimension (a
        sample, or a token where a model folds its sequence into that dimension) stays out
        of the fit: on those, row by row, the solver's weights must fit better than rounding
        to nearest to be kept (a solver fitting few samples per input column learns their
        noise), and the reported errors are measured there.  0 (the default: the fit's
        quarter of the data less costs more on the bench than the check saves): fit every
        entry and decide on the fit's own statistics.
    """

    weight_clipping: str = "mse"
    max_columns: int = 65536
    cache_budget_mb: int = 1024
    statistics_correction: bool = True
    qdrop: float = 0.0
    damping: float = 0.01
    act_order: bool = True
    block: int = 128
    iterations: int = 1000
    regularization: float = 0.01
    held_out: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if self.weight_clipping not in ("minmax", "mse", "lp"):
            raise ConfigError(f"weight_clipping={self.weight_clipping!r} is unknown: use minmax, mse or lp")
        if self.max_columns < 16:
            raise ConfigError(f"max_columns={self.max_columns} must be at least 16 (e.g. 65536)")
        if not 0.0 <= self.qdrop < 1.0:
            raise ConfigError(f"qdrop={self.qdrop} must be in [0, 1), e.g. 0.5")
        if self.cache_budget_mb < 0:
            raise ConfigError(f"cache_budget_mb={self.cache_budget_mb} must be >= 0")
        if not 0.0 < self.damping <= 1.0:
            raise ConfigError(f"damping={self.damping} must be in (0, 1], e.g. 0.01")
        if self.block < 1:
            raise ConfigError(f"block={self.block} must be at least 1")
        if self.held_out == 1 or self.held_out < 0:
            raise ConfigError(f"held_out={self.held_out} must be 0 (fit on every sample) or at least 2 (e.g. 4: a quarter held out)")
        if self.iterations < 1:
            raise ConfigError(f"iterations={self.iterations} must be at least 1 (e.g. 1000)")
        if self.regularization < 0:
            raise ConfigError(f"regularization={self.regularization} must be >= 0 (e.g. 0.01)")
