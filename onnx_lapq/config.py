"""Typed, validated options of a quantization run (frozen dataclasses, keyword-only).

Every field has a default that gives W8A8 with per-channel weights; each check in
``__post_init__`` raises :class:`ConfigError` with a message that says how to fix it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from .bits import SUPPORTED_BITS, BitsPolicy, LayerBits, layer_bits
from .errors import ConfigError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse", "lp", "lapq")
SEARCHES = ("powell", "coordinate")
LOSSES = ("auto", "kl", "mse", "cosine", "ce")
SEARCH_BIAS_CORRECTION = ("auto", "on", "off", "race")
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QUANTIZABLE_OP_TYPES = DEFAULT_OP_TYPES + ("Gather",)  # Gather: embedding tables, weight-only


# the type of every field, checked before any value (a new field must join one of these)
INT_FIELDS = ("weight_bits", "act_bits", "batch_size", "seed", "histogram_bins", "max_evals", "search_iterations", "memory_budget_mb", "block_size")
OPTIONAL_INT_FIELDS = ("num_samples", "search_samples")
NUMBER_FIELDS = ("percentile", "lp_norm", "search_step")
OPTIONAL_NUMBER_FIELDS = ("time_limit",)
BOOL_FIELDS = ("per_channel", "weight_symmetric", "act_symmetric", "keep_first_last_8bit", "quantize_attention", "bias_correction", "weight_only")
STR_FIELDS = ("method", "search", "loss", "search_bias_correction")
OPTIONAL_STR_FIELDS = ("label_key", "mask_input")
STR_TUPLE_FIELDS = ("exclude", "exclude_op_types", "op_types", "custom_op_libraries")
NUMBER_TUPLE_FIELDS = ("lp_grid",)
LAYER_BITS_FIELDS = ("layer_bits",)  # checked and normalized by bits.layer_bits


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and bool(np.isfinite(value))


def _type_error(config: "QuantConfig") -> str | None:
    """What is wrong with the type of a field, or None."""
    for names, fits, wanted in (
        (INT_FIELDS, _is_int, "an int"),
        (OPTIONAL_INT_FIELDS, lambda v: v is None or _is_int(v), "an int or None"),
        (NUMBER_FIELDS, _is_number, "a finite number"),
        (OPTIONAL_NUMBER_FIELDS, lambda v: v is None or _is_number(v), "a finite number or None"),
        (BOOL_FIELDS, lambda v: isinstance(v, bool), "True or False"),
        (STR_FIELDS, lambda v: isinstance(v, str), "a string"),
        (OPTIONAL_STR_FIELDS, lambda v: v is None or isinstance(v, str), "a string or None"),
        (STR_TUPLE_FIELDS, lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v), "a tuple of strings"),
        (NUMBER_TUPLE_FIELDS, lambda v: isinstance(v, tuple) and all(_is_number(x) for x in v), "a tuple of numbers"),
    ):
        for name in names:
            value = getattr(config, name)
            if not fits(value):
                return f"{name}={value!r} must be {wanted}"
    return None


def _check_bits(name: str, value: int) -> None:
    if value not in SUPPORTED_BITS:
        raise ConfigError(f"{name}={value!r} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What to quantize and how.

    weight_bits, act_bits: 2..8 or 16. 8-bit exports as int8/uint8, 4-bit as
        INT4/UINT4 (opset 21), 16-bit as INT16/UINT16 (opset 21); 2, 3, 5, 6 and 7
        bits use an 8-bit container whose range is restricted to 2**bits levels.
    per_channel: per-output-channel weight scales (per-tensor when False).
    weight_symmetric: weights with zero point 0 and range -(2**(b-1)-1)..2**(b-1)-1.
    act_symmetric: activations with zero point 0 (unsigned when never negative).
    method: how activation clipping ranges are chosen from the calibration
        statistics: minmax, percentile, entropy (KL), mse, or lp (with lp_norm).
        mse and lp also choose per-channel weight clipping (exactly, on the weights);
        the other methods clip weights at their min/max.  lapq starts from the
        Lp clipping at the best p of ``lp_grid`` and searches all clipping values
        jointly against the end-to-end ``loss`` (LAPQ, Nahshan et al. 2019).
    exclude: regular expressions; nodes whose name matches one fully stay float.
    exclude_op_types: op types that stay float.
    op_types: op types whose weights and inputs are quantized; add "Gather" to store
        embedding tables (constant 2-D Gather data) as integers too (weights only).
    keep_first_last_8bit: the first and last quantized layers use 8 bits.
    num_samples: use the first this many calibration samples (None: all given).
    batch_size: rows per ONNX Runtime call when calibration arrays are split.
    seed: seeds every random choice of the run.
    lp_grid: the p values of LAPQ's initialization sweep.
    search: "powell" (scipy's, over all coordinates) or "coordinate" (one at a time).
    max_evals, time_limit: search budgets (loss evaluations, seconds; None = none);
        the best point seen is kept when a budget stops the search.  max_evals bounds the
        search's own evaluations; LAPQ's start candidates (the Lp sweep and the
        calibrators, once per side of a bias-correction race) come on top.  time_limit
        covers the start candidates and the search (a start always completes).
    search_iterations: Powell iterations / coordinate sweeps (at most; the budgets
        usually stop the search first).
    search_step: the search moves each log clip factor on a lattice of this step
        (0.01: 1% of a clip) and evaluates each lattice point once; below about 1%
        the calibration loss changes by rounding noise alone.  0: no lattice.
    loss: the search's objective: auto (kl for classifiers, cosine for normalized
        embeddings, else mse), kl, mse,
        cosine, or ce (cross-entropy against the calibration labels).
    label_key: name of the labels array in the calibration data (for loss="ce").
    memory_budget_mb: cached activations the loss evaluator may keep.
    search_samples: LAPQ evaluates its loss on a seeded random subset of this many
        calibration samples (None: all); statistics always use every sample.
    mask_input: the graph input that marks real (1) and padded (0) positions of
        [batch, sequence] inputs; activations shaped [batch, sequence, ...] are observed
        at real positions only.  "auto": a 2-D integer input whose name contains
        "mask"; None: observe every position.
    quantize_attention: also quantize MatMuls of two activations (attention scores and
        context), at their inputs.
    bias_correction: correct Conv/Gemm biases for the mean output shift that weight
        quantization causes (per-channel input means from calibration; Nagel et al. 2019).
    search_bias_correction: whether LAPQ's search keeps bias correction (when it is on):
        "race" (the default) searches both ways with a quarter of ``max_evals`` (and of
        ``time_limit``) each and spends the rest continuing the one with the lower loss;
        "auto" keeps it only where it more than halves the loss of the min/max start;
        "on" and "off" decide for every network.
    weight_only: quantize only the weights of MatMuls (activations stay float), in
        blocks of ``block_size`` rows: the form ONNX Runtime runs as MatMulNBits at 4 bits.
        It needs no calibration data (quantize may be given None).
    custom_op_libraries: paths of shared libraries of custom ops (ONNX Runtime's
        register_custom_ops_library) that every ONNX Runtime session of the run loads:
        for models with ops of custom domains.
    layer_bits: explicit widths per layer, node name -> {"weight_bits": b, "act_bits": b}
        (either may be left out), over keep_first_last_8bit and the uniform widths; stored
        as a tuple of :class:`LayerBits`.  ``bits_policy`` is what the plan reads.
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_symmetric: bool = True
    act_symmetric: bool = False
    method: str = "minmax"
    percentile: float = 99.999
    lp_norm: float = 2.4
    exclude: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    keep_first_last_8bit: bool = False
    num_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    histogram_bins: int = 4096
    lp_grid: tuple[float, ...] = (2.0, 2.5, 3.0, 3.5, 4.0)
    search: str = "powell"
    max_evals: int = 1000
    time_limit: float | None = None
    search_iterations: int = 10
    search_step: float = 0.01
    loss: str = "auto"
    label_key: str | None = None
    memory_budget_mb: int = 1024
    search_samples: int | None = None
    mask_input: str | None = "auto"
    quantize_attention: bool = False
    bias_correction: bool = True
    search_bias_correction: str = "race"
    weight_only: bool = False
    block_size: int = 32
    custom_op_libraries: tuple[str, ...] = ()
    layer_bits: tuple[LayerBits, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_bits", layer_bits(self.layer_bits))
        for field in STR_TUPLE_FIELDS + NUMBER_TUPLE_FIELDS:  # lists are welcome; frozen fields must hash
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        for field in STR_TUPLE_FIELDS:
            if isinstance(getattr(self, field), str):
                raise ConfigError(f"{field} must be a tuple of strings, not one string: write {field}=({getattr(self, field)!r},)")
        problem = _type_error(self)
        if problem:
            raise ConfigError(problem)
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"method={self.method!r} is unknown: use one of {', '.join(CALIBRATION_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (50, 100], e.g. 99.999")
        if not 0.5 <= self.lp_norm <= 8.0:
            raise ConfigError(f"lp_norm={self.lp_norm} must be in [0.5, 8], e.g. 2.4")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"exclude pattern {pattern!r} is not a valid regular expression ({exc}): fix or quote it") from None
        unknown = set(self.op_types) - set(QUANTIZABLE_OP_TYPES)
        if unknown:
            raise ConfigError(f"op_types {sorted(unknown)} cannot be quantized: choose from {', '.join(QUANTIZABLE_OP_TYPES)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be at least 1 (or None for all)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.search not in SEARCHES:
            raise ConfigError(f"search={self.search!r} is unknown: use one of {', '.join(SEARCHES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is unknown: use one of {', '.join(LOSSES)}")
        if self.loss == "ce" and self.label_key is None:
            raise ConfigError("loss='ce' needs labels: set label_key (CLI: --labels KEY) to the name of the labels array in the calibration data")
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
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two, at least 16 (ONNX Runtime's MatMulNBits)")
        if self.weight_only and self.method not in ("minmax", "mse", "lp"):
            raise ConfigError(f"weight_only quantizes weights alone: use method minmax, mse or lp, not {self.method!r}")
        if self.weight_only and "MatMul" in self.exclude_op_types:
            raise ConfigError(
                "exclude_op_types=('MatMul',) with weight_only excludes every layer it takes (it quantizes MatMuls, and Gemms "
                "as MatMuls): exclude the layers to keep float by name pattern (exclude=...) instead"
            )
        if self.memory_budget_mb < 0:
            raise ConfigError("memory_budget_mb must be >= 0")
        for library in self.custom_op_libraries:
            if not os.path.isfile(library):
                raise ConfigError(f"custom op library {library!r} does not exist: give the path of the shared library that implements the model's custom ops")
        if self.histogram_bins not in tuple(2**k for k in range(8, 17)):
            raise ConfigError(f"histogram_bins={self.histogram_bins} must be a power of two from 256 to 65536")

    def excludes_node(self, name: str, op_type: str) -> bool:
        """True when a node stays float by name pattern or op type."""
        return op_type in self.exclude_op_types or any(re.fullmatch(p, name) for p in self.exclude)

    @property
    def bits_policy(self) -> BitsPolicy:
        """The widths of each layer, as the plan reads them."""
        return BitsPolicy.of(self)

    @property
    def needs_opset21(self) -> bool:
        """4-bit and 16-bit Q/DQ types and blockwise DequantizeLinear exist only from opset 21."""
        return self.weight_only or any(b in (4, 16) for b in self.bits_policy.widths)
