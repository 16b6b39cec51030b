"""Numbers for the sites of a plan: clipping ranges -> scales and zero points.

``SiteRanges`` holds what calibration chose: a real range [lo, hi] per activation
group and per weight (arrays per channel or block, scalars per tensor).
``qparams`` turns them into a :class:`QParams` per quantized tensor, and biases get
s_b = s_in * s_w with zero point 0.  Where a bias would not fit int32 on that grid (16-bit
grids, or a channel of near-zero weights), the layer's weight scale grows, channel by
channel, until it fits with room to spare, as ONNX Runtime's own quantizer does: a float
bias is no way out, since ONNX Runtime's WeightBiasQuantization rewrites it into an
int32 bias on the s_in * s_w grid anyway, overflowing.  This is the only module that
knows how ranges map to integer grids.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .clip import activation_format
from .ops import folds_clip_into_quantize
from .plan import QuantPlan
from .qmath import QFormat, scale_zero_point

INT32 = QFormat(32, signed=True, symmetric=False)
BIAS_HEADROOM = 2.0  # int32 room for the bias, in multiples of its float magnitude (bias correction moves it)


@dataclass(frozen=True)
class QParams:
    """Scale (float32), zero point (int64), integer grid and axis of one quantized tensor."""

    scale: np.ndarray
    zero_point: np.ndarray
    fmt: QFormat
    axis: int | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class SiteRanges:
    """Clipping chosen for a plan: activation group -> (lo, hi); weight -> (lo, hi) per channel;
    bias -> the magnitude per channel that its int32 grid must hold."""

    activations: dict[str, tuple[float, float]] = field(default_factory=dict)
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    biases: dict[str, np.ndarray] = field(default_factory=dict)


def qparams(plan: QuantPlan, ranges: SiteRanges, *, weight_symmetric: bool, act_symmetric: bool) -> dict[str, QParams]:
    """QParams for every weight, activation and bias tensor of ``plan``."""
    out: dict[str, QParams] = {}
    for group in plan.groups:
        lo, hi = ranges.activations[group]
        fmt = activation_format(lo, plan.group_bits(group), act_symmetric)
        scale, zp = scale_zero_point(lo, hi, fmt)
        for site in plan.activations:
            if site.group == group:
                out[site.tensor] = QParams(scale, zp, fmt)
    formats = {site.tensor: QFormat(site.bits, signed=True, symmetric=weight_symmetric) for site in plan.weights}
    widened = _widened_for_biases(plan, ranges, formats, out)
    for site in plan.weights:
        lo, hi = widened.get(site.tensor, ranges.weights[site.tensor])
        scale, zp = scale_zero_point(lo, hi, formats[site.tensor])
        out[site.tensor] = QParams(scale, zp, formats[site.tensor], site.axis, site.block_size)
    for bias in plan.biases:
        s_in, s_w = out[bias.scale_site].scale, out[bias.weight_tensor].scale
        scale = (np.float32(s_in) * s_w.astype(np.float32)).astype(np.float32)
        out[bias.tensor] = QParams(scale, np.zeros(scale.shape, np.int64), INT32, 0 if scale.ndim else None)
    return out


def range_of(qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """The clipping range (lo, hi) whose grid is exactly ``qp``'s (scale_zero_point gives it back)."""
    scale = np.asarray(qp.scale, np.float64)
    zero = np.asarray(qp.zero_point, np.float64)
    return (qp.fmt.qmin - zero) * scale, (qp.fmt.qmax - zero) * scale


def _widened_for_biases(plan: QuantPlan, ranges: SiteRanges, formats: dict[str, QFormat], acts: dict[str, QParams]) -> dict[str, tuple]:
    """Weight ranges scaled up, channel by channel, so that each bias of magnitude
    ``ranges.biases`` fits int32 on its s_in * s_w grid (only the weights that need it)."""
    widened: dict[str, tuple] = {}
    for bias in plan.biases:
        magnitude = ranges.biases.get(bias.tensor)
        if magnitude is None or bias.scale_site not in acts:
            continue
        lo, hi = widened.get(bias.weight_tensor, ranges.weights[bias.weight_tensor])
        s_w = scale_zero_point(lo, hi, formats[bias.weight_tensor])[0].astype(np.float64)
        needed = np.asarray(magnitude, np.float64) / (float(acts[bias.scale_site].scale) * INT32.qmax)
        # per tensor: the largest channel's need; per channel: a bias of shape (1,) (Gemm broadcasts it) holds for every channel
        needed = needed.max(initial=0.0) if s_w.size == 1 else np.broadcast_to(needed, s_w.shape)
        factor = np.maximum(needed / s_w, 1.0)
        if np.any(factor > 1.0):
            widened[bias.weight_tensor] = (np.asarray(lo, np.float64) * factor, np.asarray(hi, np.float64) * factor)
    return widened


# Bounds of a search coordinate: the log of the factor applied to an initial clip.
LOG_FACTOR_BOUNDS = (float(np.log(0.05)), float(np.log(2.0)))


class ParamSpace:
    """The search vector x <-> clipping ranges.

    One coordinate per activation group and one per weight site (but those in ``fixed``,
    weights that a method rounded onto their grid); x_i is the log of the
    factor that scales the initial range of that site (all channels of a weight
    together).  x = 0 is the initialization.  No activation clip whose Clip ONNX Runtime
    folds into its QuantizeLinear is lifted past that Clip's ceiling (``QuantPlan.ceiling``).

    Coordinates run from the coarsest grid to the finest, and within one bit-width below
    8 in the order the graph reads the sites, a layer's input before its weight; at 8 bits
    and above the activations come first, then the weights, each front to back.  A budget
    smaller than one Powell sweep then goes to whole layers from the front, and at W4A8 to
    the 4-bit weights before the 8-bit activations.  Below 8 bits both a layer's weights and
    its input lose much, so whole layers fixed front to back serve a small budget best; at
    8 bits and above, per-channel weights lose almost nothing and the activations, where
    the loss is, come first.
    """

    def __init__(self, plan: QuantPlan, initial: SiteRanges, fixed: frozenset[str] = frozenset()):
        self.plan = plan
        self.initial = initial
        read = {t: i for i, t in enumerate(plan.reads)}
        unread = len(read)
        group_read: dict[str, int] = {}
        for a in plan.activations:
            group_read[a.group] = min(group_read.get(a.group, unread), read.get(a.tensor, unread))
        coordinates = [
            (plan.group_bits(g), 0, group_read.get(g, unread), 0, "act", g) for g in plan.groups
        ] + [(w.bits, int(w.bits >= 8), read.get(w.tensor, unread), 1, "weight", w.tensor) for w in plan.weights if w.tensor not in fixed]
        self.coordinates = [(kind, name) for *_, kind, name in sorted(coordinates, key=lambda c: c[:4])]
        self.names = [f"{kind}:{name}" for kind, name in self.coordinates]
        self.caps = {g: c for g in plan.groups if (c := self._cap(g)) is not None}

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def bounds(self) -> list[tuple[float, float]]:
        """LOG_FACTOR_BOUNDS, the upper one lowered where it would lift a clip past its cap."""
        low, high = LOG_FACTOR_BOUNDS
        caps = {("act", g): np.log(cap / self.initial.activations[g][1]) for g, cap in self.caps.items()}
        return [(low, float(min(high, caps.get(c, high)))) for c in self.coordinates]

    def ranges(self, x: np.ndarray) -> SiteRanges:
        factors = dict(zip(self.coordinates, np.exp(np.asarray(x, np.float64))))
        acts = {g: (lo * factors["act", g], min(hi * factors["act", g], self.caps.get(g, np.inf))) for g, (lo, hi) in self.initial.activations.items()}
        weights = {w: (lo * factors["weight", w], hi * factors["weight", w]) if ("weight", w) in factors else (lo, hi) for w, (lo, hi) in self.initial.weights.items()}
        return SiteRanges(activations=acts, weights=weights, biases=self.initial.biases)

    def _cap(self, group: str) -> float | None:
        """The highest clip of an activation group whose Clip ONNX Runtime folds into the
        QuantizeLinear (``ops.folds_clip_into_quantize``): the plan's ceiling, where the
        initial clip is below it (a search from above it may still come down).  At narrower
        widths nothing folds, and a clip past a Relu6's 6 can still pay through the grid it
        makes, so those groups are not capped."""
        ceiling = self.plan.ceiling(group)
        hi = self.initial.activations[group][1]
        return ceiling if ceiling is not None and 0 < hi <= ceiling and folds_clip_into_quantize(self.plan.group_bits(group)) else None
