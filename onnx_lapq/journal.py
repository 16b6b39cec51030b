"""The journal of a LAPQ run's loss evaluations, with which an interrupted run resumes.

Given its inputs a LAPQ run computes the same thing every time, so the losses it measured,
in order, are all it needs to pick up where it stopped.  Each entry holds the digest of one
evaluated point (the scale and zero point of every site, and whether bias correction was
on) and the loss measured there.  A run given a journal with entries makes the same
computation again: each evaluation whose point matches the journal's next entry takes the
recorded loss instead of running ONNX Runtime, and once the entries are spent it measures
and records.  So the Lp sweep, the start candidates, the bias-correction race and the
search all resume, and the run ends with the same model, bytes and all, as one that was
never stopped.  A point that differs from its entry is a :class:`CheckpointError`.

The binding says which run a journal belongs to: digests of the model and of the
calibration batches, every config field, and the versions of onnx_lapq and of ONNX
Runtime (whose kernels make the losses).  A journal resumes only the run it is bound to.
A time limit makes a search depend on the machine's speed, so a journaled run refuses one.

No file I/O here: ``to_text`` and ``from_text`` give the journal's JSON form, and the
``on_record`` hook, called after every recorded evaluation, lets the caller save it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime

from . import __version__
from .errors import CheckpointError, ConfigError

FORMAT = "onnx_lapq search journal"
FORMAT_VERSION = 1
DIGEST_CHARS = 24  # hex characters of a point's sha256 kept: a chance match of another point is out of reach


@dataclass
class SearchJournal:
    """The evaluations of one run (``entries``: (point digest, loss), in order), the run it is
    bound to (None until a run binds it), and ``on_record(journal)``, called after each
    evaluation it records."""

    entries: list[tuple[str, float]] = field(default_factory=list)
    binding: dict[str, Any] | None = None
    on_record: Callable[["SearchJournal"], None] | None = None

    def to_text(self) -> str:
        """The journal as JSON (losses as exact hexadecimal floats)."""
        entries = [[digest, float(loss).hex()] for digest, loss in self.entries]
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "binding": self.binding, "entries": entries})

    @classmethod
    def from_text(cls, text: str | bytes, *, source: str = "the journal") -> "SearchJournal":
        """A journal from ``to_text``'s JSON; CheckpointError naming ``source`` if it is not one."""
        try:
            data = json.loads(text)
            if data["format"] != FORMAT or data["version"] != FORMAT_VERSION or not isinstance(data["binding"], dict):
                raise ValueError
            entries = [(digest, float.fromhex(loss)) for digest, loss in data["entries"]]
            if not all(isinstance(digest, str) for digest, _ in entries):
                raise ValueError
        except (ValueError, TypeError, KeyError):  # json's errors (UnicodeDecodeError too) are ValueErrors
            raise CheckpointError(
                f"{source} is not a readable onnx_lapq checkpoint (damaged, truncated or another file): delete it and start over without resuming"
            ) from None
        return cls(entries=entries, binding=data["binding"])

    def bind(self, binding: dict[str, Any]) -> None:
        """Bind a new journal to the run described by ``binding`` (see ``run_binding``), or
        check that a bound one describes the same run: CheckpointError saying what differs."""
        binding = json.loads(json.dumps(binding, default=_number))  # as it reads back from to_text
        if self.binding is None:
            self.binding = binding
            return
        difference = _difference(self.binding, binding)
        if difference is not None:
            raise CheckpointError(f"the checkpoint belongs to another run: {difference}; resume with what it was made from, or start over without resuming")

    def record(self, digest: str, loss: float) -> None:
        self.entries.append((digest, loss))
        if self.on_record is not None:
            self.on_record(self)


class JournaledLoss:
    """A loss evaluator's ``__call__`` through a journal: each evaluation replays the
    journal's next entry while there is one, and is measured and recorded after."""

    def __init__(self, evaluator, journal: SearchJournal):
        self.evaluator, self.journal = evaluator, journal
        self.position = 0  # evaluations made so far in this run, replayed or measured
        self.replayed = 0

    def __call__(self, params: dict) -> float:
        digest = point_digest(params, bool(self.evaluator.solution.input_means))
        self.position += 1
        if self.position <= len(self.journal.entries):
            expected, loss = self.journal.entries[self.position - 1]
            if expected != digest:
                raise CheckpointError(
                    f"evaluation {self.position} of this run is not the checkpoint's: the run changed since the checkpoint was written "
                    "(inputs, settings or onnx_lapq's own code); start over without resuming"
                )
            self.replayed += 1
            return loss
        loss = float(self.evaluator(params))
        self.journal.record(digest, loss)
        return loss


def check_journal(journal: SearchJournal | None, config) -> None:
    """A journal is a SearchJournal, for a lapq run that no time limit makes machine-dependent."""
    if journal is None:
        return
    if not isinstance(journal, SearchJournal):
        raise ConfigError(f"journal must be an onnx_lapq.SearchJournal (or None), not {type(journal).__name__}")
    if config.method != "lapq":
        raise ConfigError(f"a journal records a lapq search, and method={config.method!r} makes none: pass it with method='lapq' only")
    if config.lapq.time_limit is not None:
        raise ConfigError(
            f"time_limit={config.lapq.time_limit} makes the search depend on the machine's speed, so it could not resume the same: "
            "bound the search with max_evals alone"
        )


def point_digest(params: dict, bias_correction: bool) -> str:
    """The digest of one evaluated point: every site's scale, zero point and grid, and
    whether bias correction is on."""
    h = hashlib.sha256(b"bias correction" if bias_correction else b"no bias correction")
    for name in sorted(params):
        qp = params[name]
        h.update(name.encode())
        for array in (qp.scale, qp.zero_point):
            array = np.asarray(array)
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(repr((qp.fmt, qp.axis, qp.block_size)).encode())
    return h.hexdigest()[:DIGEST_CHARS]


def run_binding(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], config) -> dict[str, Any]:
    """What a journal is bound to: digests of the model and the calibration batches, the
    config, and the versions of the code that computes the losses."""
    return {
        "versions": {"onnx_lapq": __version__, "onnxruntime": onnxruntime.__version__},
        "model": model_digest(model),
        "calibration": batches_digest(batches),
        "config": asdict(config),
    }


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of a model, part by part (each graph field item on its own, so that models
    over protobuf's 2 GB limit digest too)."""
    h = hashlib.sha256()
    for name, part in _parts(model):
        for key, item in _parts(part) if name == "graph" else [(name, part)]:
            h.update(key.encode())
            h.update(item.SerializeToString() if hasattr(item, "SerializeToString") else repr(item).encode())
    return h.hexdigest()


def batches_digest(batches: list[dict[str, np.ndarray]]) -> str:
    """sha256 of calibration batches: every array's name, type, shape and values, in order."""
    h = hashlib.sha256()
    for batch in batches:
        for name, value in batch.items():
            value = np.asarray(value)
            h.update(f"{name}{value.dtype.str}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _parts(message):
    """(field name, value) of each set field of a protobuf message, repeated fields item by item."""
    for descriptor, value in message.ListFields():
        for item in value if descriptor.is_repeated else [value]:
            yield descriptor.name, item


def _difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between a journal's binding and this run's, in words; None if nothing."""
    if recorded.get("versions") != current["versions"]:
        return f"it was written by {_versions(recorded.get('versions'))}, this is {_versions(current['versions'])}"
    old, new = _flat(recorded.get("config", {})), _flat(current["config"])
    for name in new:
        if old.get(name, "(absent)") != new[name]:
            return f"it was made with {name}={_shown(old.get(name, '(absent)'))}, this run has {name}={_shown(new[name])}"
    for what, words in (("model", "another model"), ("calibration", "other calibration data")):
        if recorded.get(what) != current[what]:
            return f"it was made from {words}"
    return None


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A config's fields with those of its nested options (whose names are unique) among them."""
    flat = {}
    for name, value in config.items():
        flat.update(value if isinstance(value, dict) else {name: value})
    return flat


def _versions(versions) -> str:
    if not isinstance(versions, dict):
        return "an unknown version"
    return " with ".join(f"{package} {version}" for package, version in versions.items())


def _shown(value) -> str:
    """A config value as its QuantConfig field would read (lists were tuples)."""
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _number(value):
    """A numpy scalar (config fields may be numpy integers) as the Python number JSON takes."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
