"""Shared small-model builders, the digits CNN and a small lapq config, ONNX Runtime helpers
and a numpy reference interpreter.

Every model here is built from scratch with deterministic weights
(np.random.default_rng) and pins its IR version (onnx 1.23 writes IR 14 by default,
which ONNX Runtime 1.31 refuses): IR 8 for opset 13, IR 10 for opset 21.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lapq import LapqOptions, QuantConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS_MODEL = REPO / "models" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "models" / "digits_cnn_calib.npz"
DIGITS_HELDOUT = REPO / "models" / "digits_cnn_heldout.npz"

IR_FOR_OPSET = {13: 8, 21: 10}

if str(REPO) not in sys.path:  # import the working tree's package, installed or not
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- building


def make_model(nodes, inputs, outputs, initializers=None, *, opset=13, extra_opsets=(), check=True) -> onnx.ModelProto:
    """A ModelProto at ``opset`` with a pinned IR version ORT accepts.

    ``inputs``/``outputs``: lists of (name, elem_type, shape) or ValueInfoProtos.
    ``initializers``: {name: ndarray or TensorProto}.
    """
    def info(v):
        return v if isinstance(v, onnx.ValueInfoProto) else helper.make_tensor_value_info(*v)

    inits = [v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test_graph", [info(i) for i in inputs], [info(o) for o in outputs], initializer=inits)
    opsets = [helper.make_opsetid("", opset)] if opset is not None else []
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnx_lapq-tests")
    model.ir_version = IR_FOR_OPSET.get(opset, 8)
    if check:
        onnx.checker.check_model(model)
    return model


class Net:
    """Tiny layer-by-layer builder: each method appends a named node and returns its output name."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def _w(self, name, shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        self.inits[name] = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return name

    def conv(self, name, x, cin, cout, k=3, *, pad=1, stride=1, bias=True):
        inputs = [x, self._w(f"{name}_W", (cout, cin, k, k))]
        if bias:
            inputs.append(self._w(f"{name}_B", (cout,), 0.1))
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, pads=[pad] * 4, strides=[stride] * 2, kernel_shape=[k, k]))
        return name

    def gemm(self, name, x, fin, fout, *, trans_b=1):
        shape = (fout, fin) if trans_b else (fin, fout)
        self.inits[f"{name}_W"] = (self.rng.standard_normal(shape) / np.sqrt(fin)).astype(np.float32)
        self._w(f"{name}_B", (fout,), 0.1)
        self.nodes.append(helper.make_node("Gemm", [x, f"{name}_W", f"{name}_B"], [name], name=name, transB=trans_b))
        return name

    def matmul(self, name, x, fin, fout):
        self.inits[f"{name}_W"] = (self.rng.standard_normal((fin, fout)) / np.sqrt(fin)).astype(np.float32)
        self.nodes.append(helper.make_node("MatMul", [x, f"{name}_W"], [name], name=name))
        return name

    def op(self, op_type, name, inputs, **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def bn(self, name, x, channels):
        self.inits[f"{name}_gamma"] = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
        self.inits[f"{name}_beta"] = self.rng.normal(0, 0.2, channels).astype(np.float32)
        self.inits[f"{name}_mean"] = self.rng.normal(0, 0.2, channels).astype(np.float32)
        self.inits[f"{name}_var"] = self.rng.uniform(0.5, 2.0, channels).astype(np.float32)
        return self.op("BatchNormalization", name, [x] + [f"{name}_{p}" for p in ("gamma", "beta", "mean", "var")], epsilon=1e-5)

    def model(self, inputs, outputs, *, opset=13):
        return make_model(self.nodes, inputs, outputs, self.inits, opset=opset)


def conv_chain_model(*, opset=13, seed=0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> Relu -> Conv(stride 2) -> Relu -> Flatten -> Gemm(transB=1) -> y[N,10]."""
    net = Net(np.random.default_rng(seed))
    h = net.op("Relu", "relu1", [net.conv("conv1", "x", 3, 4)])
    h = net.op("Relu", "relu2", [net.conv("conv2", h, 4, 6, stride=2)])
    h = net.op("Flatten", "flat", [h], axis=1)
    net.gemm("fc", h, 6 * 4 * 4, 10)
    return net.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [("fc", TensorProto.FLOAT, ["N", 10])], opset=opset)


def block_model(*, opset=13, seed=1) -> onnx.ModelProto:
    """Residual block, two branches into a Concat, a MaxPool between convs, a Gemm at the end.

    x -> conv1 -> relu1 -> conv2 -> Add(conv2, relu1) -> relu2
      -> {conva -> relua, convb -> relub} -> Concat cat -> conv3 -> relu3 -> MaxPool pool
      -> conv4 -> relu4 -> Flatten flat -> Gemm fc (transB=1) -> fc
    """
    net = Net(np.random.default_rng(seed))
    r1 = net.op("Relu", "relu1", [net.conv("conv1", "x", 2, 4)])
    add = net.op("Add", "add", [net.conv("conv2", r1, 4, 4), r1])
    r2 = net.op("Relu", "relu2", [add])
    ra = net.op("Relu", "relua", [net.conv("conva", r2, 4, 3)])
    rb = net.op("Relu", "relub", [net.conv("convb", r2, 4, 3, k=1, pad=0)])
    cat = net.op("Concat", "cat", [ra, rb], axis=1)
    r3 = net.op("Relu", "relu3", [net.conv("conv3", cat, 6, 4)])
    pool = net.op("MaxPool", "pool", [r3], kernel_shape=[2, 2], strides=[2, 2])
    r4 = net.op("Relu", "relu4", [net.conv("conv4", pool, 4, 4)])
    flat = net.op("Flatten", "flat", [r4], axis=1)
    net.gemm("fc", flat, 4 * 4 * 4, 5)
    return net.model([("x", TensorProto.FLOAT, ["N", 2, 8, 8])], [("fc", TensorProto.FLOAT, ["N", 5])], opset=opset)


def relu6_model(*, opset=13, seed=3) -> onnx.ModelProto:
    """x -> conv1 -> Clip(0, 6) clip1 -> conv2 -> Clip(0, 6) clip2 -> conv3 -> Relu relu3 -> Flatten -> Gemm fc,
    with weights large enough that both Clips saturate (MobileNet's Relu6)."""
    net = Net(np.random.default_rng(seed))
    net.inits["zero"], net.inits["six"] = np.float32(0.0), np.float32(6.0)
    h = net.op("Clip", "clip1", [net.conv("conv1", "x", 3, 8), "zero", "six"])
    h = net.op("Clip", "clip2", [net.conv("conv2", h, 8, 8), "zero", "six"])
    h = net.op("Relu", "relu3", [net.conv("conv3", h, 8, 4)])
    net.gemm("fc", net.op("Flatten", "flat", [h], axis=1), 4 * 8 * 8, 10)
    for name in ("conv1_W", "conv2_W"):
        net.inits[name] *= 6
    return net.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [("fc", TensorProto.FLOAT, ["N", 10])], opset=opset)


def random_inputs(model: onnx.ModelProto, n: int, *, seed: int = 0, batch: int | None = None) -> list[dict[str, np.ndarray]]:
    """Calibration batches (list of dicts) for a model with one float input; symbolic dim 0 = n."""
    rng = np.random.default_rng(seed)
    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    shape = [n] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    data = rng.standard_normal(shape).astype(np.float32)
    batch = batch or n
    return [{inp.name: data[i:i + batch]} for i in range(0, n, batch)]


def digits():
    """The shipped digits CNN and its whole calibration file as one batch."""
    return onnx.load(DIGITS_MODEL), [dict(np.load(DIGITS_CALIB))]


def lapq_config(**kw):
    """A W3A3 lapq config of 120 evaluations, weights rounded to nearest (so that the search
    tunes every clip, weights' too, and races bias correction); keywords that name LapqOptions'
    fields go there."""
    searched = {f.name for f in dataclasses.fields(LapqOptions)}
    top = {k: v for k, v in kw.items() if k not in searched}
    options = {"max_evals": 120, **{k: v for k, v in kw.items() if k in searched}}
    return QuantConfig(**{"weight_bits": 3, "act_bits": 3, "method": "lapq", "weights": "nearest", **top}, lapq=LapqOptions(**options))


# --------------------------------------------------------------------------- running


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    """``python -m onnx_lapq ARGS`` in a subprocess on this working tree's package."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "onnx_lapq", *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
    )


def ort_session(model: onnx.ModelProto, *, optimize=True, optimized_path=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto, feeds: dict, *, optimize=True, outputs=None):
    return ort_session(model, optimize=optimize).run(outputs, feeds)


def with_outputs(model: onnx.ModelProto, names_types: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named tensors (elem types given)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name, elem in names_types.items():
        out.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return out


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    matches = [t for t in model.graph.initializer if t.name == name]
    assert matches, f"no initializer {name!r}"
    return matches[0]


def init_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(initializer(model, name))


# --------------------------------------------------------------------------- numpy reference


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _conv(x, w, b, node):
    pads = _attr(node, "pads", [0, 0, 0, 0])
    strides = _attr(node, "strides", [1, 1])
    assert _attr(node, "group", 1) == 1
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    y = np.einsum("nchwij,mcij->nmhw", win, w.astype(np.float64))
    if b is not None:
        y = y + b.astype(np.float64).reshape(1, -1, 1, 1)
    return y.astype(np.float32)


def _gemm(x, w, b, node):
    w = w.T if _attr(node, "transB", 0) else w
    y = x.astype(np.float64) @ w.astype(np.float64)
    if b is not None:
        y = y + b.astype(np.float64)
    return y.astype(np.float32)


def numpy_forward(model: onnx.ModelProto, feeds: dict, *, constants=None, hook=None) -> dict[str, np.ndarray]:
    """Run a float model's nodes in numpy (float64 accumulation, float32 tensors).

    ``constants`` overrides initializers (e.g. fake-quantized weights); ``hook(name, value)``
    may replace every non-constant tensor as it is produced (including graph inputs).
    """
    hook = hook or (lambda name, value: value)
    env = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env.update(constants or {})
    for name, value in feeds.items():
        env[name] = hook(name, np.asarray(value, np.float32))
    for node in model.graph.node:
        args = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op == "Conv":
            y = _conv(args[0], args[1], args[2] if len(args) > 2 else None, node)
        elif op == "Gemm":
            y = _gemm(args[0], args[1], args[2] if len(args) > 2 else None, node)
        elif op == "MatMul":
            y = (args[0].astype(np.float64) @ args[1].astype(np.float64)).astype(np.float32)
        elif op == "Relu":
            y = np.maximum(args[0], 0).astype(np.float32)
        elif op == "Add":
            y = (args[0] + args[1]).astype(np.float32)
        elif op == "Concat":
            y = np.concatenate(args, axis=_attr(node, "axis"))
        elif op == "Flatten":
            y = args[0].reshape(args[0].shape[0], -1)
        elif op == "MaxPool":
            k = _attr(node, "kernel_shape")
            assert list(k) == list(_attr(node, "strides")) and _attr(node, "pads") is None
            n, c, h, w = args[0].shape
            y = args[0].reshape(n, c, h // k[0], k[0], w // k[1], k[1]).max(axis=(3, 5))
        else:
            raise NotImplementedError(op)
        env[node.output[0]] = hook(node.output[0], y)
    return env


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
