"""What the bit allocation reads (allocation.py): each layer's candidates, their costs, their sizes.

A layer's candidates are its weight widths, or with candidate activation widths every pair
(weight bits, input bits).  A candidate's cost is the measured loss increase of its weight
width plus that of its input's width, the latter shared among the layers that read the same
activation group (they are tied to take one input width: one Tie per group whose classes are
the candidates of each input width), never below 0, plus a tie-break far below any measured
difference that keeps a layer at its widest until the budget needs the room.  Its size is in
the budget's unit: bytes as stored, the codes' bits / 8 (``target_bits``), or bit operations
(``target_bops``: MACs × weight bits × input bits, bops.py), the one unit in which input
widths count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .allocation import Tie
from .bops import FLOAT_BITS
from .export import container
from .largemodel import element_bits
from .plan import WeightSite
from .qmath import QFormat
from .solution import Solution

SCALE_BYTES = 4  # one float32 scale per output channel (or per tensor, or per block)
TIE_BREAK = 1e-6  # of the largest cost: the price of narrowing a site whose narrowing measured free (allocation.MIP_GAP below it)


@dataclass(frozen=True)
class Candidates:
    """The (weight bits, input bits or None) of every candidate of every layer, and each
    layer's input group (None where its input stays float or input widths are not chosen)."""

    pairs: tuple[tuple[int, int | None], ...]
    groups: tuple[str | None, ...]

    @classmethod
    def of(cls, widths: tuple[int, ...], act_widths: tuple[int, ...], groups: list[str | None]) -> "Candidates":
        pairs = tuple((w, a) for w in widths for a in act_widths) if act_widths else tuple((w, None) for w in widths)
        return cls(pairs, tuple(groups) if act_widths else (None,) * len(groups))

    @property
    def widest(self) -> int:
        return len(self.pairs) - 1

    def ties(self) -> tuple[Tie, ...]:
        """Layers reading one activation group take candidates of one input width."""
        classes = tuple(tuple(k for k, (_, a) in enumerate(self.pairs) if a == width)
                        for width in dict.fromkeys(a for _, a in self.pairs))
        readers: dict[str, list[int]] = {}
        for layer, group in enumerate(self.groups):
            if group is not None:
                readers.setdefault(group, []).append(layer)
        return tuple(Tie(tuple(layers), classes) for layers in readers.values() if len(layers) > 1)

    def expand(self, pair: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
        """A [weight widths, weight widths] pair term as a [candidates, candidates] one."""
        index = [widths.index(w) for w, _ in self.pairs]
        return pair[np.ix_(index, index)]


def costs(weights: dict[str, dict[int, float]], acts: dict[str, dict[int, float]], sites: list[WeightSite],
          candidates: Candidates, sizes: np.ndarray, act_bits: dict[str, int]) -> np.ndarray:
    """[sites, candidates]: each candidate's measured loss increase (weights: node -> {bits: ΔL};
    acts: group -> {bits: ΔL}; ``act_bits``: each group's width in the plan) with the tie-break."""
    readers = {g: candidates.groups.count(g) for g in set(candidates.groups) if g is not None}

    def act_cost(group, bits) -> float:
        if group is None or bits is None or bits >= act_bits[group]:
            return 0.0
        return max(acts[group][bits], 0.0) / readers[group]

    increase = np.array([[(0.0 if w >= s.bits else max(weights[s.node][w], 0.0)) + act_cost(g, a) for w, a in candidates.pairs]
                         for s, g in zip(sites, candidates.groups)])
    tie = TIE_BREAK * max(float(increase.max()), np.finfo(np.float64).tiny)
    w_bits = np.array([w for w, _ in candidates.pairs], np.float64)
    a_bits = np.array([a or 1 for _, a in candidates.pairs], np.float64)
    given_up = (1.0 - w_bits / w_bits.max()) + (1.0 - a_bits / a_bits.max())  # bytes saved first, then bits given up
    return increase + tie * ((1.0 - sizes / sizes.max(axis=1, keepdims=True)) + given_up)


def sizes(solution: Solution, sites: list[WeightSite], candidates: Candidates, options, symmetric: bool,
          macs: np.ndarray | None, in_bits: np.ndarray | None) -> tuple[np.ndarray, float, float, str]:
    """(size of each site at each candidate [sites, candidates], the budget, the float32
    weights' size, the unit): "bytes" as stored, "bits" (the grids' bits / 8, ``target_bits``)
    or "bops" (``target_bops``: ``macs`` × weight bits × input bits, ``in_bits`` the plan's
    where the candidate or the layer's input sets none; the whole in float32 weights at the
    plan's input widths);
    an accuracy bound's budget is every site at its widest."""
    if macs is not None:
        full = FLOAT_BITS * float((macs * in_bits).sum())
        table = np.array([[m * w * (a if a is not None and g is not None else b) for w, a in candidates.pairs]
                          for m, b, g in zip(macs, in_bits, candidates.groups)])
        return table, options.target_bops * full, full, "bops"
    count = sum(solution.weights[s.tensor].size for s in sites)
    float_bytes = 4.0 * count
    if options.target_bits is not None:  # average bits of the codes
        table = np.array([[solution.weights[s.tensor].size * w / 8 for w, _ in candidates.pairs] for s in sites])
        return table, options.target_bits * count / 8, float_bytes, "bits"
    table = np.array([[weight_bytes(solution, s, w, symmetric) for w, _ in candidates.pairs] for s in sites])  # codes, scales, zero points
    budget = options.target_size * float_bytes if options.target_size is not None else float(table.max(axis=1).sum())
    return table, budget, float_bytes, "bytes"


def weight_bytes(solution: Solution, site: WeightSite, bits: int, symmetric: bool) -> float:
    """Bytes the export stores for a weight at ``bits``: its codes in their container (4-bit
    types packed two to a byte; 2, 3, 5-7 bits in 8-bit integers), a float32 scale and a zero
    point in the codes' container per channel."""
    weight = solution.weights[site.tensor]
    channels = weight.shape[site.axis] if site.axis is not None else 1
    stored = element_bits(container(QFormat(bits, signed=True, symmetric=symmetric)))
    return -(-weight.size * stored // 8) + channels * SCALE_BYTES + -(-channels * stored // 8)


def infeasible(options, least: float, float_bytes: float) -> str:
    """The one-line error of a budget below ``least``, naming the least feasible value."""
    if options.target_bops is not None:
        return (f"target_bops={options.target_bops} is below the fewest bit operations the candidate widths allow "
                f"({least / float_bytes:.4f} of those with float weights): give at least {np.ceil(least / float_bytes * 1e4) / 1e4}")
    if options.target_size is not None:
        return (f"target_size={options.target_size} is below the smallest model the candidate widths allow "
                f"({least / float_bytes:.4f} of the float weights): give at least {np.ceil(least / float_bytes * 1e4) / 1e4}")
    return (f"target_bits={options.target_bits} is below what the narrowest candidate reaches "
            f"({min(options.candidate_bits)} bits a weight): give at least {min(options.candidate_bits)}")
