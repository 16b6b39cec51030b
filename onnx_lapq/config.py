"""Typed, validated options of a quantization run (frozen dataclasses, keyword-only).

Every field has a default that gives W8A8 with per-channel weights; the options of each
method are grouped in their own dataclass (options.py).  Each check in ``__post_init__``
raises :class:`ConfigError` with a message that says how to fix it.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace

from .bits import SUPPORTED_BITS, BitsPolicy, LayerBits, layer_bits
from .errors import ConfigError
from .mixedoptions import MixedPrecisionOptions
from .options import (
    AUTO_RECONSTRUCTION, CALIBRATORS, CONVOLUTIONS, WEIGHT_METHODS, CalibrationOptions, LapqOptions, ReconstructionOptions, SparsityOptions,
    check_patterns, check_types,
)

CALIBRATION_METHODS = CALIBRATORS + ("lapq",)  # QuantConfig.method: a calibrator or LAPQ
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QUANTIZABLE_OP_TYPES = DEFAULT_OP_TYPES + ("Gather",)  # Gather: embedding tables, weight-only


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
    weight_symmetric: weights with zero point 0 and range -(2**(b-1)-1)..2**(b-1)-1 (True),
        or each channel or block on the grid of its own [min, max] (False); None: symmetric,
        except weight_only blocks without N:M sparsity, which are asymmetric (MatMulNBits with
        zero points, which fits a block's 32 values better at no cost in speed; a pruned
        weight must be the code 0).  ``symmetric_weights`` is the one a run uses.
    act_symmetric: activations with zero point 0 (unsigned when never negative).
    method: how clipping ranges are chosen: a calibrator from the statistics (minmax,
        percentile, entropy (KL), mse, or lp; options in ``calibration``), where mse and
        lp also choose per-channel weight clipping exactly, on the weights, and the others
        clip weights at their min/max; or lapq, which starts from the best of the Lp
        clipping at the best p, min/max and entropy, and searches all clipping values
        jointly against the end-to-end loss (LAPQ, Nahshan et al. 2019; options in ``lapq``).
    exclude: regular expressions; nodes whose name matches one fully stay float.
    exclude_op_types: op types that stay float.
    op_types: op types whose weights and inputs are quantized; add "Gather" to store
        embedding tables (constant 2-D Gather data) as integers too (weights only).
    keep_first_last_8bit: the first and last quantized layers use 8 bits.
    num_samples: use the first this many calibration samples (None: all given).
    batch_size: rows per ONNX Runtime call when calibration arrays are split.
    seed: seeds every random choice of the run.
    label_key: name of the labels array in the calibration data (for lapq's loss="ce").
    mask_input: the graph input that marks real (1) and padded (0) positions of
        [batch, sequence] inputs; activations shaped [batch, sequence, ...] are observed
        at real positions only.  "auto": a 2-D integer input whose name contains
        "mask"; None: observe every position.
    quantize_attention: also quantize MatMuls of two activations (attention scores and
        context), at their inputs.
    bias_correction: correct Conv/Gemm biases for the mean output shift that weight
        quantization causes (per-channel input means from calibration; Nagel et al. 2019).
    weight_only: quantize only the weights of MatMuls (activations stay float), in
        blocks of ``block_size`` rows: the form ONNX Runtime runs as MatMulNBits at 4 bits.
        It needs no calibration data (quantize may be given None).
    custom_op_libraries: paths of shared libraries of custom ops (ONNX Runtime's
        register_custom_ops_library) that every ONNX Runtime session of the run loads:
        for models with ops of custom domains.
    layer_bits: explicit widths per layer, node name -> {"weight_bits": b, "act_bits": b}
        (either may be left out), over keep_first_last_8bit and the uniform widths; stored
        as a tuple of :class:`LayerBits`.  ``bits_policy`` is what the plan reads.
    weights: how the weights are rounded onto their grids: "nearest", or a reconstruction
        ("gptq": rounding with error feedback; "adaround": learned rounding) that chooses each
        layer's weights front to back so that its output in the quantized model matches the
        float model's (options in ``reconstruction``; the clipping method then chooses the
        activation ranges); "auto": where some layer's weights are (or, with mixed precision,
        may be) narrower than 8 bits, except with weight_only (which runs without calibration
        data), a reconstruction: adaround on a model with convolutions among its layers, gptq
        on one of Gemm/MatMul layers only (``for_layers`` settles it for the model); else nearest.
        ``weight_rounding`` is the one a run uses.
    calibration: the calibrators' options (:class:`CalibrationOptions`).
    lapq: LAPQ's options (:class:`LapqOptions`).
    reconstruction: the weight reconstruction's options (:class:`ReconstructionOptions`).
    sparsity: N:M sparsity of the weights, pruned before they are quantized (:class:`SparsityOptions`).
    mixed_precision: per-layer weight widths chosen under a size budget (:class:`MixedPrecisionOptions`).
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_symmetric: bool | None = None
    act_symmetric: bool = False
    method: str = "minmax"
    exclude: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    keep_first_last_8bit: bool = False
    num_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    label_key: str | None = None
    mask_input: str | None = "auto"
    quantize_attention: bool = False
    bias_correction: bool = True
    weight_only: bool = False
    block_size: int = 32
    custom_op_libraries: tuple[str, ...] = ()
    layer_bits: tuple[LayerBits, ...] = ()
    weights: str = "auto"
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    lapq: LapqOptions = field(default_factory=LapqOptions)
    reconstruction: ReconstructionOptions = field(default_factory=ReconstructionOptions)
    sparsity: SparsityOptions = field(default_factory=SparsityOptions)
    mixed_precision: MixedPrecisionOptions = field(default_factory=MixedPrecisionOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_bits", layer_bits(self.layer_bits))
        check_types(self)
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        for name, own in (("candidate_bits", "weight_bits"), ("candidate_act_bits", "act_bits")):
            candidates = getattr(self.mixed_precision, name)
            for bits in candidates:
                _check_bits(name, bits)
            if candidates and getattr(self, own) != max(candidates):
                raise ConfigError(f"{own}={getattr(self, own)} must be the widest of {name} ({max(candidates)}): every layer starts there")
        if self.mixed_precision.allocates and self.weight_only:
            raise ConfigError("mixed precision allocates the widths of quantized layers, not of weight_only blocks: leave weight_only off")
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"method={self.method!r} is unknown: use one of {', '.join(CALIBRATION_METHODS)}")
        if self.weights not in WEIGHT_METHODS:
            raise ConfigError(f"weights={self.weights!r} is unknown: use one of {', '.join(WEIGHT_METHODS)}")
        check_patterns("exclude", self.exclude)
        unknown = set(self.op_types) - set(QUANTIZABLE_OP_TYPES)
        if unknown:
            raise ConfigError(f"op_types {sorted(unknown)} cannot be quantized: choose from {', '.join(QUANTIZABLE_OP_TYPES)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be at least 1 (or None for all)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.lapq.loss == "ce" and self.label_key is None:
            raise ConfigError("loss='ce' needs labels: set label_key (CLI: --labels KEY) to the name of the labels array in the calibration data")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two, at least 16 (ONNX Runtime's MatMulNBits)")
        if self.weight_only and self.method not in ("minmax", "mse", "lp"):
            raise ConfigError(f"weight_only quantizes weights alone: use method minmax, mse or lp, not {self.method!r}")
        if self.weight_only and "MatMul" in self.exclude_op_types:
            raise ConfigError(
                "exclude_op_types=('MatMul',) with weight_only excludes every layer it takes (it quantizes MatMuls, and Gemms "
                "as MatMuls): exclude the layers to keep float by name pattern (exclude=...) instead"
            )
        for library in self.custom_op_libraries:
            if not os.path.isfile(library):
                raise ConfigError(f"custom op library {library!r} does not exist: give the path of the shared library that implements the model's custom ops")

    def excludes_node(self, name: str, op_type: str) -> bool:
        """True when a node stays float by name pattern or op type."""
        return op_type in self.exclude_op_types or any(re.fullmatch(p, name) for p in self.exclude)

    @property
    def bits_policy(self) -> BitsPolicy:
        """The widths of each layer, as the plan reads them."""
        return BitsPolicy.of(self)

    @property
    def symmetric_weights(self) -> bool:
        """Whether the weights' grids are symmetric: ``weight_symmetric``, with None resolved."""
        if self.weight_symmetric is not None:
            return self.weight_symmetric
        return not self.weight_only or self.sparsity.pattern is not None

    @property
    def weight_rounding(self) -> str:
        """The rounding of the weights a run uses: ``weights``, with "auto" resolved (as for a
        convolutional model until :meth:`for_layers` settles it)."""
        if self.weights != "auto":
            return self.weights
        narrow = any(b < 8 for b in (*self.bits_policy.weight_widths, *self.mixed_precision.candidate_bits))
        return AUTO_RECONSTRUCTION["convolutional"] if narrow and not self.weight_only else "nearest"

    def for_layers(self, op_types: Collection[str]) -> QuantConfig:
        """This config with weights="auto" settled for a model whose quantized layers have
        these op types (see ``weights``)."""
        if self.weights != "auto" or self.weight_rounding == "nearest":
            return self
        kind = "convolutional" if set(op_types) & set(CONVOLUTIONS) else "linear"
        return replace(self, weights=AUTO_RECONSTRUCTION[kind])

    @property
    def needs_opset21(self) -> bool:
        """4-bit and 16-bit Q/DQ types and blockwise DequantizeLinear exist only from opset 21."""
        candidates = (*self.mixed_precision.candidate_bits, *self.mixed_precision.candidate_act_bits)
        return self.weight_only or any(b in (4, 16) for b in (*self.bits_policy.widths, *candidates))


def _nested_option_hint(init):
    """QuantConfig's generated __init__, with a ConfigError that names the nested options
    class of a keyword that belongs to one (``max_evals`` -> ``lapq=LapqOptions(...)``)
    instead of Python's bare TypeError."""
    owners = {f.name: (name, kind) for name, kind in (("lapq", LapqOptions), ("calibration", CalibrationOptions), ("reconstruction", ReconstructionOptions), ("sparsity", SparsityOptions),
                                                                ("mixed_precision", MixedPrecisionOptions)) for f in fields(kind)}

    @functools.wraps(init)
    def checked(self, **options):
        for option in options:
            if option in owners:
                name, kind = owners[option]
                raise ConfigError(f"{option} is an option of {kind.__name__}: write QuantConfig({name}={kind.__name__}({option}=...))")
        init(self, **options)
    return checked


QuantConfig.__init__ = _nested_option_hint(QuantConfig.__init__)
