"""The typed options (QuantConfig, LapqOptions, CalibrationOptions, ReconstructionOptions): every field's type is
checked, a wrong type or a nested options object of the wrong class is a one-line
ConfigError naming the field, lists and numpy integers are taken, and quantize refuses
anything but a QuantConfig."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import conv_chain_model, random_inputs
from onnx_lapq import CalibrationOptions, ConfigError, LapqOptions, MixedPrecisionOptions, QuantConfig, ReconstructionOptions, SparsityOptions, quantize
from onnx_lapq.options import checked_types


def test_quantize_rejects_non_config():
    with pytest.raises(ConfigError):
        quantize(conv_chain_model(), random_inputs(conv_chain_model(), 8), config={"weight_bits": 4})
    with pytest.raises(ConfigError, match="on_step must be a function"):
        quantize(conv_chain_model(), random_inputs(conv_chain_model(), 8), on_step=True)


def test_every_config_field_has_a_checked_type():
    nested = {f.name for f in dataclasses.fields(QuantConfig) if f.type in ("CalibrationOptions", "LapqOptions", "ReconstructionOptions", "SparsityOptions", "MixedPrecisionOptions")}
    assert nested == {"calibration", "lapq", "reconstruction", "sparsity", "mixed_precision"}
    for options in (QuantConfig, LapqOptions, CalibrationOptions, ReconstructionOptions, SparsityOptions, MixedPrecisionOptions):
        unchecked = [f.name for f in dataclasses.fields(options) if f.name not in nested and f.type not in checked_types()]
        assert not unchecked


@pytest.mark.parametrize("bad", [
    {"percentile": "99.9"}, {"block_size": 32.0}, {"bias_correction": "no"}, {"per_channel": 0}, {"batch_size": 2.5},
    {"time_limit": float("nan")}, {"seed": None}, {"lp_grid": 2.0}, {"exclude": (1,)}, {"mask_input": 5}, {"max_evals": 10.5},
    {"weight_bits": True}, {"damping": "0.1"}, {"act_order": 1},
])
def test_config_rejects_wrong_types_with_a_config_error(bad):
    (field, value), = bad.items()
    owner = next(o for o in (QuantConfig, LapqOptions, CalibrationOptions, ReconstructionOptions) if field in {f.name for f in dataclasses.fields(o)})
    with pytest.raises(ConfigError, match=f"^{field}=.* must be "):
        owner(**bad)


def test_nested_options_of_the_wrong_type_are_a_config_error():
    with pytest.raises(ConfigError, match="^lapq=.* must be an onnx_lapq.LapqOptions"):
        QuantConfig(lapq={"max_evals": 10})


def test_config_takes_lists_and_numpy_ints():
    config = QuantConfig(exclude=["a.*"], weight_bits=np.int64(4), lapq=LapqOptions(lp_grid=[2, 3.5]))
    assert config.exclude == ("a.*",) and config.lapq.lp_grid == (2, 3.5) and hash(config)


@pytest.mark.parametrize("option, owner", [
    ("max_evals", "lapq=LapqOptions"), ("percentile", "calibration=CalibrationOptions"), ("damping", "reconstruction=ReconstructionOptions"),
])
def test_a_nested_option_given_to_quantconfig_says_where_it_goes(option, owner):
    with pytest.raises(ConfigError, match=rf"^{option} is an option of .*: write QuantConfig\({owner}\({option}=\.\.\.\)\)$"):
        QuantConfig(**{option: 1})
    with pytest.raises(ConfigError, match=f"^{option} is an option of"):
        dataclasses.replace(QuantConfig(), **{option: 1})


def test_option_names_are_unique_across_the_nested_options():
    """The journal and the CLI's error wording read nested options by their field names alone."""
    names = [f.name for options in (QuantConfig, LapqOptions, CalibrationOptions, ReconstructionOptions) for f in dataclasses.fields(options)]
    assert len(names) == len(set(names))
