"""How neighbouring layers' quantization errors interact, as pair terms of the bit allocation.

Pairs: graph neighbours, the weight layers m reached from layer l's output through nodes
without quantized weights and at most one node that merges activations (an Add, a Concat):
a convolution and the next in its branch, a residual branch's last convolution and the next
block's first, a depthwise convolution and its pointwise neighbours; not every later block
an identity shortcut chain reaches.

Each pair is measured at the candidate widths both can take below the widest, width for
width (ΔL({l@b, m@b}) − ΔL(l@b) − ΔL(m@b), sensitivity.pair_interactions), which fits one
coupling coefficient per pair, least squares in the scale of the two errors:

    I_lm(b, c) ≈ ρ_lm · sqrt(ΔL_l(b) · ΔL_m(c))

so three probes per pair (at candidates 2, 3, 4 below 8) give the whole [candidates,
candidates] table the integer program reads (zero where either layer is at the widest).
"""
from __future__ import annotations

import numpy as np
import onnx

from .graphindex import consumer_map
from .plan import WeightSite
from .sensitivity import ProbeJob, pair_interactions


def neighbours(model: onnx.ModelProto, sites: list[WeightSite]) -> list[tuple[int, int]]:
    """Index pairs (l, m), l < m in ``sites``' order, of weight layers one of which reads the
    other's output through nodes without quantized weights and at most one merge."""
    index = {s.node: i for i, s in enumerate(sites)}
    consumers = consumer_map(model.graph.node)
    constants = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    pairs = set()
    for node in model.graph.node:
        if node.name not in index:
            continue
        seen, frontier = set(), [(name, 0) for name in node.output]
        while frontier:
            tensor, merges = frontier.pop()
            for reader in consumers.get(tensor, []):
                if reader.name in index:
                    pairs.add(tuple(sorted((index[node.name], index[reader.name]))))
                    continue
                through = merges + (sum(1 for i in reader.input if i and i not in constants) > 1)
                if reader.name not in seen and through <= 1:
                    seen.add(reader.name)
                    frontier.extend((name, through) for name in reader.output)
    return sorted(p for p in pairs if p[0] != p[1])


def pair_terms(job: ProbeJob, sites: list[WeightSite], widths: tuple[int, ...], single: dict[str, dict[int, float]],
               executor: str, on_probe=None) -> tuple[dict[tuple[int, int], np.ndarray], dict[tuple[str, str], float]]:
    """The allocation's pair terms of every neighbour pair ((l, m) -> [candidates, candidates]),
    and each pair's coupling ρ by node names (see the module docstring)."""
    pairs = neighbours(job.model, sites)
    narrow = [b for b in widths if b < max(widths)]
    probes = [((sites[l].node, b), (sites[m].node, b)) for l, m in pairs for b in narrow
              if b < sites[l].bits and b < sites[m].bits]
    measured = pair_interactions(job, probes, single, executor, on_probe)
    terms, coupling = {}, {}
    for l, m in pairs:
        a, b = sites[l].node, sites[m].node
        strength = [np.array([max(single[n].get(w, 0.0), 0.0) if w in narrow else 0.0 for w in widths]) for n in (a, b)]
        scale = np.sqrt(np.outer(*strength))  # √(ΔL_l(b)·ΔL_m(c)); 0 at the widest
        seen = [(measured[((a, w), (b, w))], scale[k, k]) for k, w in enumerate(widths) if ((a, w), (b, w)) in measured]
        weight = sum(s * s for _, s in seen)
        coupling[(a, b)] = rho = sum(i * s for i, s in seen) / weight if weight > 0 else 0.0
        terms[(l, m)] = rho * scale
    return terms, coupling
