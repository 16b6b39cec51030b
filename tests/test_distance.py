"""Distances between reference and quantized outputs, and the choice of distance."""
from __future__ import annotations

import numpy as np
from conftest import block_model, random_inputs
from onnx import numpy_helper

import onnx_lapq
from onnx_lapq.distance import distance
from onnx_lapq.evaluator import LossEvaluator
from onnx_lapq.graph import normalize


def test_distances_against_numpy():
    rng = np.random.default_rng(0)
    ref, out = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(1, keepdims=True)
    np.testing.assert_allclose(distance("kl", ref, out, None, False), (p * np.log(p / q)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(distance("kl", p, q, None, True), (p * np.log(p / q)).sum(1), rtol=1e-10)
    labels = np.array([0, 1, 2, 3, 4])
    np.testing.assert_allclose(distance("ce", ref, out, labels, False), -np.log(q[np.arange(5), labels]), rtol=1e-10)
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(distance("cosine", ref, out, None, False), 1 - cos, rtol=1e-10)
    np.testing.assert_allclose(distance("mse", ref, out, None, False), ((out - ref) ** 2).sum(1) / (ref**2).sum(1), rtol=1e-10)


def test_auto_loss_leaves_kl_when_the_softmax_is_saturated():
    """Logits in the thousands make every KL underflow to nothing: auto takes mse there."""
    calib = None
    kinds = {}
    for scale in (1.0, 1e4):
        model = block_model(opset=21)
        for t in model.graph.initializer:
            if t.name in ("fc_W", "fc_B"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), t.name))
        calib = calib or random_inputs(model, 32, batch=16)
        result = onnx_lapq.quantize(model, calib, config=onnx_lapq.QuantConfig(bias_correction=False))
        kinds[scale] = LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="auto").kind
        assert LossEvaluator(normalize(model, min_opset=21), result.plan, calib, result.params, loss="kl").kind == "kl"  # asked for
    assert kinds == {1.0: "kl", 1e4: "mse"}
