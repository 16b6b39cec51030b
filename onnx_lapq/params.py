"""Numbers for the sites of a plan: clipping ranges -> scales and zero points.

``SiteRanges`` holds what calibration chose: a real range [lo, hi] per activation
group and per weight (arrays per channel or block, scalars per tensor).
``qparams`` turns them into a :class:`QParams` per quantized tensor, and biases get
s_b = s_in * s_w with zero point 0.  Where a bias would not fit int32 on that grid (16-bit
grids, or a channel of near-zero weights), the layer's weight scale grows, channel by
channel, until it fits with room to spare, as ONNX Runtime's own quantizer does: a float
bias is no way out, since ONNX Runtime's WeightBiasQuantization rewrites it into an
int32 bias on the s_in * s_w grid anyway, overflowing (digits CNN W16A16: outputs off by
0.81 against 8.7e-05).  This is the only module that knows how ranges map to integer grids.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .clip import activation_format
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

    One coordinate per activation group and one per weight site; x_i is the log of the
    factor that scales the initial range of that site (all channels of a weight
    together).  x = 0 is the initialization.  No 8-bit activation clip is lifted past
    the ceiling of the Clip that makes its values (``QuantPlan.ceiling``).

    Coordinates run from the coarsest grid to the finest, and within one bit-width below
    8 in the order the graph reads the sites, a layer's input before its weight; at 8 bits
    and above the activations come first, then the weights, each front to back.  A budget
    smaller than one Powell sweep then goes to whole layers from the front, and at W4A8 to
    the 4-bit weights before the 8-bit activations.  Against the earlier order (all
    activations, then all weights), the calibration loss after 150 evaluations on 64
    samples fell on squeezenet1.1 W4A8 0.373 -> 0.315 and W4A4 1.667 -> 1.330,
    mobilenet_v1_0.25 W4A8 1.433 -> 0.928 and W4A4 4.744 -> 4.509, and was level on
    mobilenet_v2 (0.359 -> 0.363, 4.856 -> 4.902); on cifar10_resnet20 W4A4 it was 0.454
    after 300 evaluations against 0.595.  all-MiniLM-L6-v2 W4A4 went the other way (60
    evaluations: 0.439 -> 0.517).  At W8A8, where per-channel 8-bit weights lose almost
    nothing, the interleaved order was worse on squeezenet1.1 (0.0052 -> 0.0066),
    mobilenet_v2 (0.0138 -> 0.0149), cifar10_resnet56 (0.0026 -> 0.0030) and
    all-MiniLM-L6-v2 (0.0089 -> 0.0098), hence activations first there (it was better
    on mobilenet_v1_0.25, 0.0372 -> 0.0333, and cifar10_resnet20, 0.0027 -> 0.0023, whose
    top-1 still fell by 0.2 and 0.1 points).
    """

    def __init__(self, plan: QuantPlan, initial: SiteRanges):
        self.plan = plan
        self.initial = initial
        read = {t: i for i, t in enumerate(plan.reads)}
        unread = len(read)
        group_read: dict[str, int] = {}
        for a in plan.activations:
            group_read[a.group] = min(group_read.get(a.group, unread), read.get(a.tensor, unread))
        coordinates = [
            (plan.group_bits(g), 0, group_read.get(g, unread), 0, "act", g) for g in plan.groups
        ] + [(w.bits, int(w.bits >= 8), read.get(w.tensor, unread), 1, "weight", w.tensor) for w in plan.weights]
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
        weights = {w: (lo * factors["weight", w], hi * factors["weight", w]) for w, (lo, hi) in self.initial.weights.items()}
        return SiteRanges(activations=acts, weights=weights, biases=self.initial.biases)

    def _cap(self, group: str) -> float | None:
        """The highest clip of an activation group of 8 bits or more: the plan's ceiling, where
        the initial clip is below it (a search from above it may still come down).  Below 8
        bits nothing fuses, and a clip past a Relu6's 6 can still pay through the grid it
        makes: capped, the mobilenet_v1_0.25 and mobilenet_v2 W4A4 searches ended higher
        (loss 4.79 against 4.51, 2.41 against 2.25, 150 evaluations on 64 samples)."""
        ceiling = self.plan.ceiling(group)
        hi = self.initial.activations[group][1]
        return ceiling if ceiling is not None and 0 < hi <= ceiling and self.plan.group_bits(group) >= 8 else None
