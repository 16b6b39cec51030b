"""Observers and the streaming calibration pass: kinds by request, exact results whatever the
batch split, padding masked out, unknown kinds refused."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import conv_chain_model, make_model, ort_run, random_inputs, with_outputs
from onnx import TensorProto, helper

import onnx_lapq.observe as observe_module
from onnx_lapq.errors import ConfigError
from onnx_lapq.observe import OBSERVERS, observe


def _whole(model, batches, names):
    """Each tensor of ``names`` over all samples, by a plain ONNX Runtime run per batch."""
    extended = with_outputs(model, {n: TensorProto.FLOAT for n in names})
    runs = [ort_run(extended, b, outputs=names) for b in batches]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def test_two_kinds_on_one_tensor_and_one_kind_on_another():
    """``relu1`` gets both observers, ``relu2`` only a range: each result is the plain run's."""
    model = conv_chain_model()
    batches = random_inputs(model, 40, batch=16)
    observed = observe(model, {"relu1": ["range", "channel_mean"], "relu2": {"range"}}, batches, half_bins=64)
    values = _whole(model, batches, ["relu1", "relu2"])
    assert observed.samples == 40
    for name in ("relu1", "relu2"):
        stats = observed.range(name)
        assert (stats.min, stats.max, stats.count) == (values[name].min(), values[name].max(), values[name].size)
        assert stats.counts.sum() == values[name].size
    np.testing.assert_allclose(observed.channel_mean("relu1"), values["relu1"].astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    assert set(observed.of_kind("channel_mean")) == {"relu1"} and list(observed.of_kind("range")) == ["relu1", "relu2"]
    with pytest.raises(KeyError, match="channel_mean.*relu2"):
        observed.channel_mean("relu2")


def test_an_unknown_kind_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="'gramm' is unknown: use one of range, channel_mean"):
        observe(conv_chain_model(), {"relu1": {"range", "gramm"}}, [], half_bins=64)
    assert set(OBSERVERS) == {"range", "channel_mean"}


def test_results_do_not_depend_on_the_batch_split_or_the_run_size(monkeypatch):
    """Observers only accumulate: the same samples in other batches, and runs cut to one
    sample by a tiny output budget, give the same ranges and histograms bit for bit and the
    same channel means up to the order of float64 sums."""
    model = conv_chain_model()
    samples = random_inputs(model, 48, batch=48)[0]["x"]
    requests = {"x": {"range", "channel_mean"}, "relu2": {"range", "channel_mean"}}
    one = observe(model, requests, [{"x": samples}], half_bins=256)
    monkeypatch.setattr(observe_module, "OUTPUT_BUDGET", 1)
    seen = []
    split = observe(model, requests, [{"x": samples[a:b]} for a, b in [(0, 5), (5, 21), (21, 48)]], half_bins=256, on_batch=seen.append)
    assert seen == [5, 21, 48] and split.samples == one.samples == 48
    for name in requests:
        a, b = one.range(name), split.range(name)
        assert (a.min, a.max, a.count, a.zeros, a.radius) == (b.min, b.max, b.count, b.zeros, b.radius)
        np.testing.assert_array_equal(a.counts, b.counts)
        np.testing.assert_allclose(one.channel_mean(name), split.channel_mean(name), rtol=1e-12)


def test_padding_is_masked_out():
    """With a [batch, sequence] mask input, padded positions of [batch, sequence, ...] tensors
    are not observed: neither the range nor the channel means see them."""
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["B", "T", 3]), ("mask", TensorProto.INT64, ["B", "T"])],
                       [("h", TensorProto.FLOAT, ["B", "T", 3]), ("m", TensorProto.FLOAT, ["B", "T"])])
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (4, 6, 3)).astype(np.float32)
    mask = (np.arange(6)[None, :] < np.array([6, 3, 2, 5])[:, None]).astype(np.int64)
    x[mask == 0] = 100.0
    observed = observe(model, {"h": {"range", "channel_mean"}}, [{"x": x, "mask": mask}], half_bins=64, mask_input="mask")
    real = x[mask == 1]
    assert observed.range("h").max == real.max() < 100.0 and observed.range("h").count == real.size
    np.testing.assert_allclose(observed.channel_mean("h"), real.astype(np.float64).mean(axis=0), rtol=1e-12)
