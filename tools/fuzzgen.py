"""Seeded generator of small, valid float ONNX graphs and quantization configs for fuzzing.

``random_case(seed)`` returns a :class:`Case`: a float ModelProto (checked with
onnx.checker and ONNX Runtime), calibration batches and the keyword arguments of a
``QuantConfig``, all drawn from ``np.random.default_rng(seed)``, so one seed always
gives the same case.  Two families of graphs:

  * convolutional, on x[N, C, H, W]: Conv (groups, depthwise, strides, dilations,
    optional bias and BatchNormalization), Relu/Clip, residual Adds, two-branch Concats,
    MaxPool/AveragePool, Transpose, Reshape, then a head of GlobalAveragePool or
    Flatten/Reshape into Gemm (transB 0/1) or MatMul + Add, optionally Softmax;
  * dense, on x[B, D] or x[B, T, D] (B symbolic, T fixed or symbolic): MatMul (+ bias
    Add, + BatchNormalization on 2-D), Gemm, Relu/Clip, LayerNormalization, residual
    Adds, Concat, Softmax, Transpose, Reshape/Flatten to 2-D, single-head attention.

Configs cover weight and activation bits 2..8 and 16, per-tensor weights,
keep_first_last_8bit, every calibration method (LAPQ with a tiny budget), bias
correction on and off, weight-only for graphs with MatMuls, and exclusions by name
and op type.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnx_lapq

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
COMMON_BITS = ((8, 8), (8, 8), (4, 8), (4, 4), (8, 16), (16, 16), (3, 3), (2, 4))  # (weight, activation)
METHODS = ("minmax", "percentile", "entropy", "mse", "lp", "lapq")
OPSETS = (11, 13, 13, 17, 17, 21)
IR_FOR_OPSET = {11: 6, 13: 7, 17: 8, 21: 10}
LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Case:
    """One fuzz case: a float model, its calibration batches and QuantConfig keyword arguments."""

    seed: int
    model: onnx.ModelProto
    calibration: list[dict[str, np.ndarray]]
    config: dict
    family: str
    layers: tuple[str, ...] = ()  # Conv/Gemm/MatMul nodes with a constant weight
    ops: tuple[str, ...] = ()


@dataclass
class _Builder:
    """Appends uniquely named nodes and initializers; each method returns its output name."""

    rng: np.random.Generator
    opset: int
    nodes: list = field(default_factory=list)
    inits: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # names of Conv/Gemm/MatMul nodes with constant weights
    attention: bool = False

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        name = f"{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        if op in LAYER_OPS and inputs[1] in self.inits:
            self.layers.append(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = f"{base}_{len(self.inits)}"
        self.inits[name] = array
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        gain = float(self.rng.choice([0.5, 1.0, 1.0, 2.0, 6.0]))
        return self.const("w", (self.rng.standard_normal(shape) * gain / np.sqrt(fan_in)).astype(np.float32))

    def vector(self, size: int, spread: float = 0.1, offset: float = 0.0) -> str:
        return self.const("b", (offset + self.rng.standard_normal(size) * spread).astype(np.float32))

    def shape_const(self, dims: list[int]) -> str:
        return self.const("shape", np.asarray(dims, np.int64))

    def activation(self, x: str) -> str:
        kind = self.rng.choice(["none", "relu", "relu", "relu6", "clip_sym", "clip_max"])
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "none":
            return x
        low, high = {"relu6": (0.0, 6.0), "clip_sym": (-1.0, 1.0), "clip_max": (None, 2.0)}[kind]
        low_name = "" if low is None else self.const("lo", np.float32(low))
        return self.node("Clip", [x, low_name, self.const("hi", np.float32(high))])

    def batchnorm(self, x: str, channels: int) -> str:
        params = [
            self.const("gamma", self.rng.uniform(0.5, 1.5, channels).astype(np.float32)),
            self.const("beta", self.rng.normal(0, 0.2, channels).astype(np.float32)),
            self.const("mean", self.rng.normal(0, 0.2, channels).astype(np.float32)),
            self.const("var", self.rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x, *params], epsilon=1e-5)


# --------------------------------------------------------------------------- convolutional family


@dataclass
class _Map:
    """A feature map tensor [N, c, h, w]."""

    name: str
    c: int
    h: int
    w: int


def _conv_out(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _conv(b: _Builder, x: _Map, *, same: bool = False, cout: int | None = None) -> _Map:
    """A Conv of a random kind (plain, grouped or depthwise); ``same`` keeps shape and channels."""
    rng = b.rng
    kind = rng.choice(["plain", "plain", "grouped", "depthwise"])
    divisors = [g for g in range(2, x.c + 1) if x.c % g == 0]
    if kind == "depthwise" or (kind == "grouped" and divisors):
        group = x.c if kind == "depthwise" or not divisors else int(rng.choice(divisors))
        mult = 1 if same else int(rng.choice([1, 1, 2]))
        cout = x.c if same else (cout if cout is not None and cout % group == 0 else group * mult * max(1, x.c // group))
    else:
        group = 1
        cout = x.c if same else (cout or int(rng.integers(1, 9)))
    k = int(rng.choice([1, 3, 3, 5])) if min(x.h, x.w) >= 5 else int(rng.choice([1, 3]))
    dilation = 2 if k == 3 and not same and min(x.h, x.w) >= 7 and rng.random() < 0.15 else 1
    stride = 1 if same or min(x.h, x.w) < 4 else int(rng.choice([1, 1, 2]))
    pad = dilation * (k // 2) if same or rng.random() < 0.7 else 0
    h, w = _conv_out(x.h, k, stride, pad, dilation), _conv_out(x.w, k, stride, pad, dilation)
    if h < 1 or w < 1:
        pad, stride, dilation = dilation * (k // 2), 1, 1
        h, w = _conv_out(x.h, k, 1, pad, 1), _conv_out(x.w, k, 1, pad, 1)
    inputs = [x.name, b.weight((cout, x.c // group, k, k), x.c // group * k * k)]
    if rng.random() < 0.7:
        inputs.append(b.vector(cout))
    attrs = dict(kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group)
    if dilation != 1:
        attrs["dilations"] = [dilation] * 2
    y = b.node("Conv", inputs, **attrs)
    if rng.random() < 0.3:
        y = b.batchnorm(y, cout)
    return _Map(b.activation(y), cout, h, w)


def _residual(b: _Builder, x: _Map) -> _Map:
    y = _conv(b, x, same=True)
    out = b.node("Add", [y.name, x.name] if b.rng.random() < 0.5 else [x.name, y.name])
    return _Map(b.node("Relu", [out]) if b.rng.random() < 0.6 else out, x.c, x.h, x.w)


def _branches(b: _Builder, x: _Map) -> _Map:
    left = _conv(b, x, same=True)
    right = x if b.rng.random() < 0.3 else _Map(_conv(b, x, same=True).name, x.c, x.h, x.w)
    return _Map(b.node("Concat", [left.name, right.name], axis=1), left.c + right.c, x.h, x.w)


def _pool(b: _Builder, x: _Map) -> _Map:
    op = str(b.rng.choice(["MaxPool", "AveragePool"]))
    if min(x.h, x.w) >= 2 and b.rng.random() < 0.6:
        return _Map(b.node(op, [x.name], kernel_shape=[2, 2], strides=[2, 2]), x.c, x.h // 2, x.w // 2)
    attrs = {"count_include_pad": int(b.rng.integers(0, 2))} if op == "AveragePool" else {}
    return _Map(b.node(op, [x.name], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], **attrs), x.c, x.h, x.w)


def _transpose(b: _Builder, x: _Map) -> _Map:
    return _Map(b.node("Transpose", [x.name], perm=[0, 1, 3, 2]), x.c, x.w, x.h)


def _reshape(b: _Builder, x: _Map) -> _Map:
    batch = int(b.rng.choice([0, -1]))
    dims = [batch, x.c, x.w, x.h] if batch == 0 else [-1, x.c, x.w, x.h]
    return _Map(b.node("Reshape", [x.name, b.shape_const(dims)]), x.c, x.w, x.h)


CONV_BLOCKS = (_conv, _conv, _conv, _residual, _branches, _pool, _transpose, _reshape)


def _conv_head(b: _Builder, x: _Map) -> tuple[str, list]:
    """Classifier or dense head over a feature map; returns the output name and its shape."""
    rng = b.rng
    kind = rng.choice(["gap", "flatten", "reshape", "none"])
    if kind == "none":
        return x.name, ["N", x.c, x.h, x.w]
    if kind == "gap":
        pooled = b.node("GlobalAveragePool", [x.name])
        flat, features = b.node("Flatten", [pooled], axis=1), x.c
    elif kind == "flatten":
        flat, features = b.node("Flatten", [x.name], axis=1), x.c * x.h * x.w
    else:
        flat, features = b.node("Reshape", [x.name, b.shape_const([0, -1])]), x.c * x.h * x.w
    out, width = _dense_2d(b, flat, features)
    if rng.random() < 0.3:
        out, width = _dense_2d(b, b.activation(out), width)
    if rng.random() < 0.4:
        out = b.node("Softmax", [out], axis=1 if b.opset < 13 else -1)
    return out, ["N", width]


def _dense_2d(b: _Builder, x: str, features: int, width: int | None = None) -> tuple[str, int]:
    """Gemm (transB 0/1, bias optional) or MatMul (+ bias Add, + BatchNormalization) on [N, features]."""
    rng = b.rng
    width = width or int(rng.integers(2, 11))
    if rng.random() < 0.6:
        trans_b = int(rng.integers(0, 2))
        inputs = [x, b.weight((width, features) if trans_b else (features, width), features)]
        if rng.random() < 0.8:
            inputs.append(b.vector(width))
        return b.node("Gemm", inputs, transB=trans_b), width
    y = b.node("MatMul", [x, b.weight((features, width), features)])
    if rng.random() < 0.7:
        y = b.node("Add", [y, b.vector(width)])
    if rng.random() < 0.3:
        y = b.batchnorm(y, width)
    return y, width


def _conv_graph(b: _Builder) -> tuple[list, list, list]:
    rng = b.rng
    c, h = int(rng.integers(1, 5)), int(rng.integers(4, 13))
    w = h if rng.random() < 0.6 else int(rng.integers(4, 13))
    x = _Map("x", c, h, w)
    taps = []
    for _ in range(int(rng.integers(1, 6))):
        x = CONV_BLOCKS[int(rng.integers(0, len(CONV_BLOCKS)))](b, x)
        if x.name != "x" and x.c * x.h * x.w > 4096:  # keep cases small
            x = _Map(b.node("MaxPool", [x.name], kernel_shape=[2, 2], strides=[2, 2]), x.c, x.h // 2, x.w // 2) if min(x.h, x.w) >= 2 else x
        taps.append((x.name, ["N", x.c, x.h, x.w]))
    if not b.layers:
        x = _conv(b, x)
    out, shape = _conv_head(b, x)
    return [("x", ["N", c, h, w])], [(out, shape)], taps


# --------------------------------------------------------------------------- dense family


@dataclass
class _Seq:
    """A tensor [B, d] (t is None) or [B, t, d] (t an int, or a str for a symbolic length)."""

    name: str
    d: int
    t: int | str | None = None

    @property
    def shape(self) -> list:
        return ["B", self.d] if self.t is None else ["B", self.t, self.d]


def _linear(b: _Builder, x: _Seq, width: int | None = None) -> _Seq:
    rng = b.rng
    width = width or int(rng.integers(2, 17))
    if x.t is None and rng.random() < 0.4:
        name, width = _dense_2d(b, x.name, x.d, width)
        return _Seq(name, width)
    y = b.node("MatMul", [x.name, b.weight((x.d, width), x.d)])
    if rng.random() < 0.7:
        bias = b.vector(width)
        y = b.node("Add", [y, bias] if rng.random() < 0.8 else [bias, y])
    if x.t is None and rng.random() < 0.25:
        y = b.batchnorm(y, width)
    return _Seq(y, width, x.t)


def _dense_act(b: _Builder, x: _Seq) -> _Seq:
    y = _linear(b, x)
    return _Seq(b.activation(y.name), y.d, y.t)


def _layernorm(b: _Builder, x: _Seq) -> _Seq:
    if b.opset < 17:
        return _dense_act(b, x)
    scale, bias = b.vector(x.d, 0.2, 1.0), b.vector(x.d)
    return _Seq(b.node("LayerNormalization", [x.name, scale, bias], axis=-1, epsilon=1e-5), x.d, x.t)


def _dense_residual(b: _Builder, x: _Seq) -> _Seq:
    y = _linear(b, x, x.d)
    y = _Seq(b.activation(y.name), y.d, y.t)
    return _Seq(b.node("Add", [x.name, y.name]), x.d, x.t)


def _dense_concat(b: _Builder, x: _Seq) -> _Seq:
    left, right = _linear(b, x), (x if b.rng.random() < 0.3 else _linear(b, x))
    return _Seq(b.node("Concat", [left.name, right.name], axis=-1), left.d + right.d, x.t)


def _softmax(b: _Builder, x: _Seq) -> _Seq:
    axis = -1 if b.opset >= 13 else len(x.shape) - 1
    return _Seq(b.node("Softmax", [x.name], axis=axis), x.d, x.t)


def _swap_time(b: _Builder, x: _Seq) -> _Seq:
    if not isinstance(x.t, int):
        return _dense_act(b, x)
    return _Seq(b.node("Transpose", [x.name], perm=[0, 2, 1]), x.t, x.d)


def _to_2d(b: _Builder, x: _Seq) -> _Seq:
    if x.t is None:
        return _dense_act(b, x)
    if isinstance(x.t, int) and b.rng.random() < 0.5:
        if b.rng.random() < 0.5:
            return _Seq(b.node("Flatten", [x.name], axis=1), x.d * x.t)
        return _Seq(b.node("Reshape", [x.name, b.shape_const([0, -1])]), x.d * x.t)
    return _Seq(b.node("Reshape", [x.name, b.shape_const([-1, x.d])]), x.d)  # rows: batch x time


def _attention(b: _Builder, x: _Seq) -> _Seq:
    if x.t is None:
        return _dense_act(b, x)
    d = int(b.rng.integers(2, 9))
    q, k, v = (_linear(b, x, d) for _ in range(3))
    kt = b.node("Transpose", [k.name], perm=[0, 2, 1])
    scores = b.node("MatMul", [q.name, kt])
    scaled = b.node("Mul", [scores, b.const("scale", np.float32(1.0 / np.sqrt(d)))])
    probs = b.node("Softmax", [scaled], axis=-1 if b.opset >= 13 else 2)
    b.attention = True
    return _Seq(b.node("MatMul", [probs, v.name]), d, x.t)


DENSE_BLOCKS = (_dense_act, _dense_act, _linear, _layernorm, _dense_residual, _dense_concat, _softmax, _swap_time, _to_2d, _attention)


def _dense_graph(b: _Builder) -> tuple[list, list, list]:
    rng = b.rng
    d = int(rng.integers(2, 17))
    t = None if rng.random() < 0.4 else (int(rng.integers(1, 7)) if rng.random() < 0.7 else "T")
    x = _Seq("x", d, t)
    inputs = [("x", x.shape)]
    taps = []
    for _ in range(int(rng.integers(1, 6))):
        x = DENSE_BLOCKS[int(rng.integers(0, len(DENSE_BLOCKS)))](b, x)
        taps.append((x.name, x.shape))
    if not b.layers:
        x = _linear(b, x)
    return inputs, [(x.name, x.shape)], taps


# --------------------------------------------------------------------------- model, data, config


def random_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, str, list[str], bool]:
    """A valid float model, its family, the names of its weight layers, and whether it has attention."""
    opset = int(rng.choice(OPSETS))
    family = str(rng.choice(["conv", "dense"]))
    b = _Builder(rng, opset)
    inputs, outputs, taps = (_conv_graph if family == "conv" else _dense_graph)(b)
    if taps and rng.random() < 0.2:  # an intermediate tensor as a second graph output
        tap = taps[int(rng.integers(0, len(taps)))]
        if tap[0] not in {o[0] for o in outputs} and tap[0] != "x":
            outputs.append(tap)
    graph = helper.make_graph(
        b.nodes, f"fuzz_{family}",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in b.inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx_lapq-fuzz")
    model.ir_version = IR_FOR_OPSET[opset]
    return model, family, list(b.layers), b.attention


def random_calibration(rng: np.random.Generator, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Calibration batches for the model's one input: a random distribution, sample count and
    batching; a symbolic sequence length sometimes varies between batches."""
    (value,) = model.graph.input
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
    samples = int(rng.choice([1, 2, 5, 8, 16, 24, 40]))
    per_batch = int(rng.integers(1, samples + 1))
    scale = float(rng.choice([0.1, 1.0, 1.0, 5.0]))
    offset = float(rng.choice([0.0, 0.0, 1.0, -2.0]))
    fixed_length = int(rng.integers(1, 7))
    vary = rng.random() < 0.3
    batches = []
    for start in range(0, samples, per_batch):
        rows = min(per_batch, samples - start)
        length = int(rng.integers(1, 7)) if vary else fixed_length
        shape = [rows] + [d if isinstance(d, int) and d > 0 else length for d in dims[1:]]
        if rng.random() < 0.3:
            data = rng.uniform(0.0, scale, shape)
        else:
            data = rng.standard_normal(shape) * scale + offset
        batches.append({value.name: data.astype(np.float32)})
    return batches


def random_config(rng: np.random.Generator, family: str, layers: list[str], attention: bool) -> dict:
    """QuantConfig keyword arguments: bits, granularity, method, budgets, exclusions."""
    if rng.random() < 0.4:
        weight_bits, act_bits = COMMON_BITS[int(rng.integers(0, len(COMMON_BITS)))]
    else:
        weight_bits, act_bits = int(rng.choice(BITS)), int(rng.choice(BITS))
    config = {
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "method": str(rng.choice(METHODS)),
        "per_channel": bool(rng.random() < 0.75),
        "keep_first_last_8bit": bool(rng.random() < 0.25),
        "bias_correction": bool(rng.random() < 0.6),
        "weight_symmetric": bool(rng.random() < 0.85),
        "act_symmetric": bool(rng.random() < 0.15),
        "batch_size": int(rng.choice([1, 4, 32])),
        "seed": int(rng.integers(0, 1000)),
    }
    if rng.random() < 0.2:
        config["histogram_bins"] = int(rng.choice([256, 1024]))
    if config["method"] == "percentile":
        config["percentile"] = float(rng.choice([99.0, 99.9, 99.999, 100.0]))
    if config["method"] == "lp":
        config["lp_norm"] = float(rng.choice([1.0, 2.4, 4.0]))
    if config["method"] == "lapq":
        config.update(_search_options(rng))
    has_matmul = family == "dense" or any(n.startswith("matmul") for n in layers)
    if has_matmul and rng.random() < 0.2:
        config.update(weight_only=True, method=str(rng.choice(["minmax", "mse", "lp"])), block_size=int(rng.choice([16, 32])))
        config.pop("max_evals", None)
    if attention and rng.random() < 0.5:
        config["quantize_attention"] = True
    if layers and rng.random() < 0.2:
        chosen = rng.choice(layers, size=int(rng.integers(1, min(2, len(layers)) + 1)), replace=False)
        config["exclude"] = [str(n) for n in chosen]
    elif layers and rng.random() < 0.05:  # a pattern over one kind of layer, or one that matches nothing
        config["exclude"] = [str(rng.choice([f"{layers[0].rstrip('0123456789')}.*", "(conv|gemm)[0-3]", "nothing_named_so"]))]
    if rng.random() < 0.08:
        config["exclude_op_types"] = [str(rng.choice(LAYER_OPS))]
    if rng.random() < 0.1:
        config["num_samples"] = int(rng.integers(1, 20))
    return config


def quant_config(options: dict) -> onnx_lapq.QuantConfig:
    """The QuantConfig of a case's flat keyword arguments: those of LapqOptions and
    CalibrationOptions go to their nested options."""
    nested = {"lapq": onnx_lapq.LapqOptions, "calibration": onnx_lapq.CalibrationOptions}
    groups = {name: {f.name for f in dataclasses.fields(kind)} for name, kind in nested.items()}
    top = {k: v for k, v in options.items() if not any(k in names for names in groups.values())}
    inner = {name: nested[name](**{k: v for k, v in options.items() if k in names}) for name, names in groups.items()}
    return onnx_lapq.QuantConfig(**top, **inner)


def _search_options(rng: np.random.Generator) -> dict:
    options = {
        "max_evals": int(rng.integers(1, 13)),
        "search": str(rng.choice(["powell", "coordinate"])),
        "search_bias_correction": str(rng.choice(["race", "race", "auto", "on", "off"])),
        "search_step": float(rng.choice([0.01, 0.01, 0.0, 0.05])),
        "lp_grid": [float(p) for p in rng.choice([2.0, 2.5, 3.0, 3.5, 4.0], size=int(rng.integers(1, 4)), replace=False)],
        "loss": str(rng.choice(["auto", "auto", "kl", "mse", "cosine"])),
    }
    if rng.random() < 0.2:
        options["search_samples"] = int(rng.integers(1, 10))
    return options


def check_float_model(model: onnx.ModelProto, batch: dict[str, np.ndarray]) -> None:
    """The generator's own guarantee: the model passes onnx.checker with shape inference and
    runs in ONNX Runtime on a calibration batch."""
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, batch)


def random_case(seed: int) -> Case:
    """The case of ``seed`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    model, family, layers, attention = random_model(rng)
    calibration = random_calibration(rng, model)
    config = random_config(rng, family, layers, attention)
    check_float_model(model, calibration[0])
    return Case(seed, model, calibration, config, family, tuple(layers), tuple(sorted({n.op_type for n in model.graph.node})))
