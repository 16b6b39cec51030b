"""The bit-width policy a plan reads: the weight and activation bits of each layer.

Three sources, by precedence, width by width: an explicit per-layer entry (node name ->
weight bits and/or activation bits), then 8 bits for the first and last quantized layers
(when asked), then the uniform widths.  A width an entry omits falls back to what the layer
gets without the entry.  An activation read by layers of different widths takes the widest
(the plan's rule), so an entry's activation bits are those of its layer's input.

A weight-only plan reads the weight bits of the explicit entries and the uniform width;
first and last layers at 8 bits concern plans with activation sites.

Entries come from the API (a mapping node -> {"weight_bits": b, "act_bits": b}, or
:class:`LayerBits`) or from a JSON bits file, ``{"layers": {"conv1": {"weight_bits": 8,
"act_bits": 8}, "fc": {"weight_bits": 4}}}``; both are checked here with one-line
:class:`ConfigError` messages.  Node names are those of the normalized model (after
BatchNormalization folding), as ``--exclude`` patterns see them.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import BitsFileError, ConfigError

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
EDGE_BITS = 8  # the first and last layers' widths when they are kept at 8 bits
WIDTHS = ("weight_bits", "act_bits")
EXAMPLE = '{"layers": {"conv1": {"weight_bits": 8, "act_bits": 8}, "fc": {"weight_bits": 4}}}'


@dataclass(frozen=True)
class LayerBits:
    """One explicit entry: the widths of node ``node`` (None: not set by this entry)."""

    node: str
    weight_bits: int | None = None
    act_bits: int | None = None


def layer_bits(entries) -> tuple[LayerBits, ...]:
    """``entries`` (a mapping node -> {"weight_bits": b, "act_bits": b}, or a sequence of
    LayerBits) as a tuple of LayerBits; ConfigError naming the first wrong entry."""
    if isinstance(entries, Mapping):
        return tuple(_entry(node, widths) for node, widths in entries.items())
    if isinstance(entries, (tuple, list)) and all(isinstance(e, LayerBits) for e in entries):
        twice = sorted({e.node for e in entries if sum(f.node == e.node for f in entries) > 1})
        if twice:
            raise ConfigError(f"layer_bits names {', '.join(map(repr, twice))} more than once: give each layer one entry")
        return tuple(_entry(e.node, {w: getattr(e, w) for w in WIDTHS if getattr(e, w) is not None}) for e in entries)
    raise ConfigError(f"layer_bits={entries!r} must map node names to their bits, e.g. {{'fc': {{'weight_bits': 4}}}}")


def _entry(node, widths) -> LayerBits:
    if not isinstance(node, str) or not node:
        raise ConfigError(f"layer bits entry {node!r}: the key must be a node name (a non-empty string)")
    if not isinstance(widths, Mapping) or not widths or set(widths) - set(WIDTHS):
        raise ConfigError(f"layer bits of {node!r} must be an object with weight_bits and/or act_bits, e.g. {{\"weight_bits\": 4}}, not {widths!r}")
    for name, value in widths.items():
        if isinstance(value, bool) or value not in SUPPORTED_BITS:
            raise ConfigError(f"{name}={value!r} for layer {node!r} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")
    return LayerBits(node, widths.get("weight_bits"), widths.get("act_bits"))


def read_bits_file(path: str) -> tuple[LayerBits, ...]:
    """The entries of a JSON bits file (see the module docstring); BitsFileError when it cannot
    be read, is not JSON or has another shape."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise BitsFileError(f"cannot read the bits file {path!r} ({exc.strerror}): give the path of a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BitsFileError(f"the bits file {path!r} is not JSON ({exc}): write it as {EXAMPLE}") from None
    if not isinstance(data, dict) or set(data) != {"layers"} or not isinstance(data["layers"], dict):
        raise BitsFileError(f"the bits file {path!r} must hold one object with a \"layers\" object: write it as {EXAMPLE}")
    try:
        return layer_bits(data["layers"])
    except ConfigError as exc:
        raise BitsFileError(f"the bits file {path!r}: {exc}") from None


def bits_file_text(plan, entries: Sequence[LayerBits] = ()) -> str:
    """A bits file (JSON) of every quantized layer's weight bits in ``plan`` (a QuantPlan),
    with the activation bits ``entries`` (a run's layer_bits) give its layers, which
    :func:`read_bits_file` reads back."""
    act = {e.node: e.act_bits for e in entries if e.act_bits is not None}
    layers = {site.node: {"weight_bits": site.bits, **({"act_bits": act[site.node]} if site.node in act else {})} for site in plan.weights}
    return json.dumps({"layers": layers}, indent=1)


@dataclass(frozen=True)
class BitsPolicy:
    """Uniform widths, 8-bit first and last layers (``first_last_8bit``) and explicit entries."""

    weight_bits: int = 8
    act_bits: int = 8
    first_last_8bit: bool = False
    layers: tuple[LayerBits, ...] = ()

    @classmethod
    def of(cls, config) -> "BitsPolicy":
        """The policy of a QuantConfig (first and last layers at 8 bits only in a plan with activations)."""
        first_last = config.keep_first_last_8bit and not config.weight_only
        return cls(config.weight_bits, config.act_bits, first_last, config.layer_bits)

    @property
    def widths(self) -> set[int]:
        """Every width the policy may give."""
        explicit = {getattr(e, w) for e in self.layers for w in WIDTHS} - {None}
        return {self.weight_bits, self.act_bits} | explicit | ({EDGE_BITS} if self.first_last_8bit else set())

    @property
    def weight_widths(self) -> set[int]:
        """Every weight width the policy may give."""
        explicit = {e.weight_bits for e in self.layers} - {None}
        return {self.weight_bits} | explicit | ({EDGE_BITS} if self.first_last_8bit else set())

    def edges(self, layers: Sequence[str]) -> set[str]:
        """The first and last of ``layers`` (quantized layers in graph order) when they are kept at 8 bits."""
        return {layers[0], layers[-1]} if self.first_last_8bit and layers else set()

    def bits(self, node: str, edge: bool = False) -> tuple[int, int]:
        """(weight bits, activation bits) of layer ``node``; ``edge``: it is the first or last layer."""
        base = (EDGE_BITS, EDGE_BITS) if edge and self.first_last_8bit else (self.weight_bits, self.act_bits)
        entry = next((e for e in self.layers if e.node == node), LayerBits(node))
        weight_bits, act_bits = (getattr(entry, w) for w in WIDTHS)
        return (base[0] if weight_bits is None else weight_bits, base[1] if act_bits is None else act_bits)

    def check_names(self, layers: Sequence[str], nodes: Sequence[str]) -> None:
        """ConfigError for an entry that names none of ``nodes`` (the model's node names), with
        some of ``layers`` (the quantized ones); a warning for an entry naming a node outside ``layers``."""
        known, quantized = set(nodes), set(layers)
        missing = [e.node for e in self.layers if e.node not in known]
        if missing:
            some = ", ".join(repr(n) for n in list(layers)[:5]) or "(none)"
            raise ConfigError(
                f"layer bits name {', '.join(map(repr, missing))}, which the model does not have: use node names as they are "
                f"after BatchNormalization folding, e.g. of the quantized layers {some}"
            )
        for entry in self.layers:
            if entry.node not in quantized:
                log.warning("layer bits for %r change nothing: the node is not a quantized layer (excluded, or not one of the op types)", entry.node)
