"""Where the loss evaluator cuts the quantized graph, and what crosses a cut.

A cut is a position in the QDQ template's node list: the tensors alive across it (made
before, read after) are cached per calibration batch with the versions of the Q/DQ tensors
read before it, and a later evaluation whose upstream numbers are unchanged runs only the
suffix of the graph after the cut.  Candidate cuts sit right before the first node that
reads each tunable Q/DQ tensor, since a coordinate search changes one site at a time.

A suffix must round exactly as the whole exported model does, so candidates obey the rules
of ONNX Runtime's graph fusions:
  * fed (Q/DQ numbers are graph inputs): ONNX Runtime fuses a Gemm or MatMul with the
    DequantizeLinear nodes of its 8-bit inputs, and a convolution with the residual Add
    after it only where the Add's other input comes from inside the graph; a tensor that
    such a node reads may not cross a cut before the node, or the suffix would run unfused
    float kernels that round differently;
  * fused (Q/DQ numbers are constants, integer kernels): only integer codes (QuantizeLinear
    outputs) and data inputs may cross, since a dequantized float tensor fed from outside
    keeps its consumer out of an integer kernel; cuts also go right after each
    QuantizeLinear.  4-D tensors cross in NHWC (a Transpose on each side), the integer
    kernels' own layout, or ONNX Runtime runs every later Add of the suffix in NCHW between
    Transposes.
Every tensor that enters or leaves a suffix keeps its inferred shape: without one, ONNX
Runtime can neither plan the integer kernels' NHWC layout nor fuse a convolution with its
residual Add as in the whole graph.  At most MAX_CUTS cuts are kept, evenly spread, and
their cached tensors fit a memory budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import onnx
from onnx import helper

from .largemodel import copy_model

log = logging.getLogger(__name__)
MAX_CUTS = 16
CHANNELS_LAST = "_nhwc"
FUSED_DEPTH_TOLERANCE = 1.5  # fused kernels run a node several times faster than fed fake-quant


@dataclass
class Cut:
    """A position in the node list with the tensors alive across it and their cached values."""

    position: int
    live: list[str]
    upstream: list[str]  # Q/DQ tensors read before the cut
    versions: tuple | None = None
    values: list[list[np.ndarray]] | None = None  # per batch, per live tensor


@dataclass
class GraphCuts:
    """The cuts of one QDQ ``template`` (fed or ``fused``) whose tunable Q/DQ tensors are
    ``tunable``, ``types`` the inferred value info of its tensors and ``output`` the output the
    loss reads.  :meth:`choose` fixes :attr:`cuts`; :meth:`suffix` builds the graph after one."""

    template: onnx.ModelProto
    types: dict[str, onnx.ValueInfoProto]
    tunable: Collection[str]
    output: str
    fused: bool
    cuts: list[Cut] = field(default_factory=list, init=False)
    channels_last: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.first_use: dict[str, int] = {}  # tunable tensor -> position of the first node that reads it
        for pos, node in enumerate(self.template.graph.node):
            for name in node.input:
                if name in self.tunable:
                    self.first_use.setdefault(name, pos)

    def candidates(self) -> list[tuple[int, list[str]]]:
        """(position, live tensors) of every cut the fusion rules allow (module docstring)."""
        nodes = list(self.template.graph.node)
        candidates = set(self.first_use.values())
        if self.fused:
            candidates |= {pos + 1 for pos, node in enumerate(nodes) if node.op_type == "QuantizeLinear"}
        producer = {o: n.op_type for n in nodes for o in n.output}
        last_fusable_use: dict[str, int] = {}  # fed: tensor -> last node that ONNX Runtime may fuse with its producer or its partner
        for pos, node in enumerate(nodes if not self.fused else []):
            if node.op_type in ("Gemm", "MatMul"):
                last_fusable_use.update({i: pos for i in node.input if producer.get(i) == "DequantizeLinear"})
            if node.op_type == "Add" and any(producer.get(i) == "Conv" for i in node.input):
                last_fusable_use.update({i: pos for i in node.input})
        constants = {t.name for t in self.template.graph.initializer} | set(self.tunable)
        found = []
        for pos in sorted(candidates - {0, len(nodes)}):
            live = live_tensors(nodes, pos, constants, self.output)
            if self.fused:
                unfit = any(producer.get(t, "input") not in ("QuantizeLinear", "input") for t in live)
            else:
                unfit = any(last_fusable_use.get(t, -1) >= pos for t in live)
            if live and not unfit:
                found.append((pos, live))
        return found

    def fused_cuts_are_fine(self) -> bool:
        """Whether these (fused) cuts let a sweep over the sites skip at least
        1/FUSED_DEPTH_TOLERANCE as much of the graph as fed cuts, one right before each site,
        would.  What a sweep skips: the mean over sites of the share of nodes before the
        deepest cut before the site, both kinds of cut spread to MAX_CUTS.  Where a float
        tensor crosses every point of the graph (an attention-mask bias) no cut qualifies and
        every fused evaluation would open and run the whole model.  Structure, not a timing,
        so the same inputs give the same model."""
        nodes = len(self.template.graph.node)
        sites = sorted(set(self.first_use.values()))

        def skipped(cut_positions: list[int]) -> float:
            cuts = [0] + _spread(cut_positions)
            return float(np.mean([max(c for c in cuts if c <= p) for p in sites])) / nodes

        fused = skipped([pos for pos, _ in self.candidates()])
        return bool(sites) and fused * FUSED_DEPTH_TOLERANCE >= skipped([p for p in sites if p > 0])

    def choose(self, sizes: dict[str, int], data_inputs: list[str], budget: int) -> list[Cut]:
        """Fix :attr:`cuts`: the start (``data_inputs`` live), then at most MAX_CUTS candidates,
        evenly spread, whose live tensors (``sizes``: bytes over all samples) fit ``budget``."""
        valid = _spread([(pos, live) for pos, live in self.candidates() if all(t in sizes for t in live)])
        self.cuts = [Cut(0, list(data_inputs), [])]
        spent = 0
        for pos, live in valid:
            cost = sum(sizes[t] for t in live)
            if spent + cost > budget:
                continue
            self.cuts.append(Cut(pos, live, sorted(n for n, p in self.first_use.items() if p < pos)))
            spent += cost
        log.debug("loss evaluator: %d cuts, %.1f MB of cached activations", len(self.cuts) - 1, spent / 1e6)
        data = set(data_inputs)
        self.channels_last = {t for c in self.cuts for t in c.live if self.fused and t not in data and _rank(self.types.get(t)) == 4}
        return self.cuts

    def refreshed_after(self, start: int) -> list[Cut]:
        """The cuts whose tensors an evaluation from cut ``start`` also returns: all later ones
        when fed; only the next one when fused, since each returned tensor stops ONNX Runtime
        from fusing the layer that makes it."""
        return self.cuts[start + 1:start + 2] if self.fused else self.cuts[start + 1:]

    def boundary(self, tensor: str) -> str:
        """The name of a cut tensor where it leaves one session and enters the next: its own,
        or with CHANNELS_LAST where it crosses in NHWC."""
        return tensor + CHANNELS_LAST if tensor in self.channels_last else tensor

    def suffix(self, cut: Cut, later_cuts: list[Cut]) -> onnx.ModelProto:
        """The template from ``cut`` on (inputs: ``cut``'s live tensors under their boundary
        names, the data inputs it reads and the Q/DQ inputs when fed), returning the output and
        ``later_cuts``' live tensors; initializers are those it reads."""
        model = copy_model(self.template)
        graph = model.graph
        keep = list(graph.node)[cut.position:]
        used = {n for node in keep for n in node.input}
        entering = [t for t in cut.live if t in self.channels_last]
        leaving = [t for t in dict.fromkeys(t for c in later_cuts for t in c.live) if t != self.output]
        layout = [helper.make_node("Transpose", [self.boundary(t)], [t], perm=[0, 3, 1, 2]) for t in entering]
        layout_out = [helper.make_node("Transpose", [t], [self.boundary(t)], perm=[0, 2, 3, 1]) for t in leaving if t in self.channels_last]
        del graph.node[:]
        graph.node.extend(layout + keep + layout_out)
        inputs = [self._crossing(t) for t in cut.live]
        inputs += [i for i in self.template.graph.input if i.name in used and i.name not in cut.live]
        del graph.input[:]
        graph.input.extend(inputs)
        outputs = [o for o in graph.output if o.name == self.output] + [self._crossing(t) for t in leaving]
        del graph.output[:]
        graph.output.extend(outputs)
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        return model

    def _crossing(self, name: str) -> onnx.ValueInfoProto:
        """``name`` with its inferred type as it crosses a cut: under its boundary name,
        NHWC-shaped if channels-last."""
        if name in self.types:
            value = onnx.ValueInfoProto.FromString(self.types[name].SerializeToString())
        else:
            value = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        if name in self.channels_last:
            value.name = self.boundary(name)
            dims = value.type.tensor_type.shape.dim
            permuted = [onnx.TensorShapeProto.Dimension.FromString(dims[i].SerializeToString()) for i in (0, 2, 3, 1)]
            del dims[:]
            dims.extend(permuted)
        return value


def _spread(items: list) -> list:
    """At most MAX_CUTS of ``items``, evenly spread: each cut holds a session (fed) and
    cached tensors."""
    if len(items) <= MAX_CUTS:
        return items
    return [items[round(i * (len(items) - 1) / (MAX_CUTS - 1))] for i in range(MAX_CUTS)]


def _rank(value: onnx.ValueInfoProto | None) -> int | None:
    shape = value.type.tensor_type.shape if value is not None else None
    return len(shape.dim) if shape is not None and value.type.tensor_type.HasField("shape") else None


def live_tensors(nodes: list[onnx.NodeProto], position: int, constants: set[str], output: str | None = None) -> list[str]:
    """Non-constant tensors made before ``position`` (or graph inputs) and read at or after it,
    plus the graph output when it is already made."""
    made_before = {o for n in nodes[:position] for o in n.output}
    made_anywhere = {o for n in nodes for o in n.output}
    read_after = dict.fromkeys(i for n in nodes[position:] for i in n.input)
    live = [t for t in read_after if t and t not in constants and (t in made_before or t not in made_anywhere)]
    if output in made_before and output not in live:
        live.append(output)
    return live
