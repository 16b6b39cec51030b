"""Calibration data: validate it against the model's inputs and stream it in batches.

Accepted forms: an iterable of ``{input_name: ndarray}`` dicts (one batch each,
samples on axis 0), an object with ``get_next()`` returning such dicts and then None
(ONNX Runtime's CalibrationDataReader), or, through :func:`npz_batches`, an ``.npz``
file (one array per input, samples on axis 0) or a folder of them.  Batches are read
one at a time; nothing here holds the whole data set.  :func:`synthetic_sample` stands in
for data where there is none (weight-only quantization's numeric check).
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)
SHORT_CALIBRATION = 32


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and shape (None for symbolic dimensions)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that calibration must feed (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return specs


class SourcedItem(dict):
    """A calibration item read from a file (:func:`npz_batches`): its errors name the file."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str):
        super().__init__(arrays)
        self.source = source


def _where(item: Any, position: int) -> str:
    return f"calibration file {item.source!r}" if isinstance(item, SourcedItem) else f"calibration item {position}"


def _items(calibration: Any) -> Iterator[Any]:
    if hasattr(calibration, "get_next"):
        while (item := calibration.get_next()) is not None:
            yield item
        return
    if isinstance(calibration, (Mapping, str, bytes, np.ndarray)) or not isinstance(calibration, Iterable):
        raise CalibrationError(
            f"calibration must be an iterable of {{input_name: array}} dicts or have get_next(), not {type(calibration).__name__}; "
            "wrap a single dict (or np.load of an .npz) in a list"
        )
    yield from calibration


def _check(item: Any, specs: list[InputSpec], position: int, label_key: str | None) -> dict[str, np.ndarray]:
    if not isinstance(item, Mapping):
        raise CalibrationError(f"calibration item {position} is a {type(item).__name__}, not a {{input_name: array}} dict")
    where = _where(item, position)
    names = {s.name for s in specs}
    if label_key is not None and label_key not in item:
        raise CalibrationError(f"{where} has no labels array {label_key!r}: add it or drop the labels option")
    missing, extra = names - set(item), set(item) - names - {label_key}
    if missing:
        raise CalibrationError(
            f"{where} has arrays {sorted(item)} but the model takes {sorted(names)}: key each array by the model's input name"
        )
    if extra:
        raise CalibrationError(
            f"{where} has arrays {sorted(extra)} that are no model input (the model takes {sorted(names)}): "
            "remove them, or name the labels array (--labels KEY, label_key)"
        )
    rows = {np.shape(v)[0] if np.ndim(v) else None for v in item.values()}
    if len(rows) != 1:
        raise CalibrationError(f"{where}: arrays have different numbers of samples on axis 0")
    batch = {}
    for spec in specs:
        value = np.asarray(item[spec.name])
        array = f"{spec.name!r} of {where}"
        if value.dtype != spec.dtype:
            raise CalibrationError(
                f"calibration input {array} is {value.dtype} but the model takes {spec.dtype}: convert it with .astype(np.{spec.dtype})"
            )
        if value.ndim != len(spec.shape) or any(d is not None and d != v for d, v in zip(spec.shape[1:], value.shape[1:])):
            want = "x".join("?" if d is None else str(d) for d in spec.shape)
            raise CalibrationError(
                f"calibration input {array} has shape {'x'.join(map(str, value.shape))} but the model takes {want}: "
                "put samples on axis 0 and match the other dimensions"
            )
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise CalibrationError(f"calibration input {array} contains NaN or Inf: clean the data before calibrating")
        batch[spec.name] = value
    if label_key is not None:
        labels = np.asarray(item[label_key])
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise CalibrationError(f"labels {label_key!r} must be a 1-D integer array (class index per sample)")
        batch[label_key] = labels.astype(np.int64)
    return batch


def iter_batches(
    calibration: Any, specs: list[InputSpec], *, batch_size: int, num_samples: int | None = None, label_key: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Validated batches of at most ``batch_size`` samples, ``num_samples`` in all.

    With ``label_key`` each item must also hold that 1-D integer array of labels,
    which the batches carry under the same key.

    Raises CalibrationError when the data does not fit the model or is empty; a short
    set (under 32 samples) is only a warning.
    """
    seen = 0
    for position, item in enumerate(_items(calibration)):
        batch = _check(item, specs, position, label_key)
        rows = next(iter(batch.values())).shape[0]
        for start in range(0, rows, batch_size):
            take = min(batch_size, rows - start)
            if num_samples is not None:
                take = min(take, num_samples - seen)
            if take <= 0:
                break
            yield {k: v[start:start + take] for k, v in batch.items()}
            seen += take
        if num_samples is not None and seen >= num_samples:
            break
    if seen == 0:
        raise CalibrationError(
            "calibration data is empty: give at least one sample (a few hundred is typical); "
            "a generator or reader that an earlier run read to its end gives none, so make a new one"
        )
    if seen < SHORT_CALIBRATION:
        log.warning("only %d calibration samples: ranges may not generalize; a few hundred is typical", seen)


def model_inputs(batches: Iterable[dict[str, np.ndarray]], label_key: str | None) -> Iterator[dict[str, np.ndarray]]:
    """The batches with the labels array (if any) removed: what the model itself takes."""
    for batch in batches:
        yield {k: v for k, v in batch.items() if k != label_key}


def calibration_files(path: str) -> list[str]:
    """The files a calibration path names: itself, or the .npz files in it (sorted) if a folder."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(glob.escape(path), "*.npz")))
    return [path]


def npz_batches(path: str) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of an .npz file, or of each .npz in a folder (sorted by name), as dicts."""
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise CalibrationError(f"calibration file {path!r} does not exist: pass an .npz (one array per model input) or a folder of them")
    files = calibration_files(path)
    if not files:
        raise CalibrationError(f"calibration folder {path!r} holds no .npz files")
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                _refuse_object_arrays(npz, file)
                item = SourcedItem({key: npz[key] for key in npz.files}, file)
        except CalibrationError:
            raise
        except Exception as exc:
            raise CalibrationError(f"{file!r} is not a readable .npz ({type(exc).__name__}): save it with numpy.savez") from None
        yield item


def _refuse_object_arrays(npz: Any, file: str) -> None:
    """CalibrationError naming an array stored with dtype object (never unpickled)."""
    members = set(npz.zip.namelist())
    for key in npz.files:
        with npz.zip.open(f"{key}.npy" if f"{key}.npy" in members else key) as fp:
            version = np.lib.format.read_magic(fp)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            dtype = read_header(fp)[2]
        if dtype.hasobject:
            raise CalibrationError(
                f"array {key!r} of calibration file {file!r} has dtype object (ragged samples or Python objects): "
                "stack the samples into one numeric array per input, e.g. np.stack(samples).astype(np.float32), and save that"
            )


def synthetic_sample(model: onnx.ModelProto, mask_input: str | None, seed: int) -> dict[str, np.ndarray]:
    """One deterministic sample of the model's inputs, symbolic dimensions 1: seeded normal
    floats, zeros for other inputs (a valid index into any table) and ones for the padding
    mask (every position real)."""
    rng = np.random.default_rng(seed)
    sample = {}
    for spec in input_specs(model):
        shape = tuple(d or 1 for d in spec.shape)
        if spec.dtype.kind == "f":
            sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            sample[spec.name] = (np.ones if spec.name == mask_input else np.zeros)(shape, spec.dtype)
    return sample


def padding_mask(model: onnx.ModelProto, mask_input: str | None) -> str | None:
    """The graph input that marks padding (see QuantConfig.mask_input), or None."""
    specs = {s.name: s for s in input_specs(model)}
    if mask_input is None:
        return None
    if mask_input != "auto":
        if mask_input not in specs:
            raise ConfigError(f"mask_input {mask_input!r} is not a graph input: choose one of {sorted(specs)}")
        return mask_input
    found = [s.name for s in specs.values() if "mask" in s.name.lower() and len(s.shape) == 2 and s.dtype.kind in "iub"]
    return found[0] if len(found) == 1 else None
