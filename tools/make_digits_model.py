"""Build the small real model shipped in ``models/``: a digits CNN in ONNX.

Trains a small convolutional network on scikit-learn's bundled 8x8 digits
set (1797 real images, no download), exports it to ONNX by hand with
``onnx.helper`` so that BatchNormalization stays as separate nodes (the
quantizer has to fold them itself), verifies the ONNX model against torch,
and writes three files:

* ``digits_cnn.onnx``          opset 13, IR 8, input "input" [N,1,8,8],
                               output "logits" [N,10]
* ``digits_cnn_calib.npz``     {"input": float32 [256,1,8,8]}
* ``digits_cnn_heldout.npz``   {"input": float32 [M,1,8,8], "label": int64 [M]}

The split is seeded and disjoint: held-out test images, then calibration
images, then everything else for training.  Output bytes are deterministic
for a given seed.

Graph: conv1+bn1+relu1 -> conv2+bn2 -> add (residual with relu1) -> relu2
-> maxpool -> {conv3a 1x1 + relu3a, conv3b 3x3 + relu3b} -> concat (32 ch)
-> conv4+bn4+relu4 -> global average pool -> flatten -> gemm (32->10).

Run from the repository root (torch is needed by this script only, never by
the library)::

    pip install torch scikit-learn
    python tools/make_digits_model.py [--out-dir models] [--seed 0]
"""

import argparse
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

N_HELDOUT = 300
N_CALIB = 256
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
BN_EPS = 1e-5
OPSET = 13
IR_VERSION = 8


# ---------------------------------------------------------------- data

def load_data():
    """Return digits images as float32 [N,1,8,8] in [0,1] and int64 labels."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = digits.target.astype(np.int64)
    return np.ascontiguousarray(x), y


def split_indices(n, seed):
    """Seeded disjoint split into (train, calib, heldout) index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    heldout = perm[:N_HELDOUT]
    calib = perm[N_HELDOUT:N_HELDOUT + N_CALIB]
    train = perm[N_HELDOUT + N_CALIB:]
    return train, calib, heldout


# ---------------------------------------------------------------- torch model

class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.conv3a = nn.Conv2d(16, 16, 1)
        self.conv3b = nn.Conv2d(16, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        r1 = torch.relu(self.bn1(self.conv1(x)))
        r2 = torch.relu(self.bn2(self.conv2(r1)) + r1)
        p = nn.functional.max_pool2d(r2, 2)
        cat = torch.cat([torch.relu(self.conv3a(p)),
                         torch.relu(self.conv3b(p))], dim=1)
        r4 = torch.relu(self.bn4(self.conv4(cat)))
        return self.fc(r4.mean(dim=(2, 3)))


def train_model(x, y, seed):
    """Train DigitsCNN deterministically with Adam; return it in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- onnx export

def _init(name, tensor):
    arr = tensor.detach().numpy().astype(np.float32)
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def conv_node(name, conv, inp, inits):
    """Append conv's weight/bias initializers; return the Conv node."""
    inits += [_init(name + ".weight", conv.weight),
              _init(name + ".bias", conv.bias)]
    k = conv.kernel_size
    pad = conv.padding
    return helper.make_node(
        "Conv", [inp, name + ".weight", name + ".bias"], [name], name=name,
        kernel_shape=list(k), pads=[pad[0], pad[1], pad[0], pad[1]],
        strides=list(conv.stride), dilations=list(conv.dilation), group=1)


def bn_node(name, bn, inp, inits):
    """Append BatchNorm initializers; return the BatchNormalization node."""
    params = [(".scale", bn.weight), (".bias", bn.bias),
              (".mean", bn.running_mean), (".var", bn.running_var)]
    inits += [_init(name + suffix, t) for suffix, t in params]
    return helper.make_node(
        "BatchNormalization", [inp] + [name + s for s, _ in params], [name],
        name=name, epsilon=bn.eps)


def op_node(op, name, inputs, **attrs):
    return helper.make_node(op, inputs, [name], name=name, **attrs)


def build_onnx(model):
    """Hand-build the ONNX graph from the trained torch model."""
    m, inits = model, []
    nodes = [
        conv_node("conv1", m.conv1, "input", inits),
        bn_node("bn1", m.bn1, "conv1", inits),
        op_node("Relu", "relu1", ["bn1"]),
        conv_node("conv2", m.conv2, "relu1", inits),
        bn_node("bn2", m.bn2, "conv2", inits),
        op_node("Add", "add1", ["bn2", "relu1"]),
        op_node("Relu", "relu2", ["add1"]),
        op_node("MaxPool", "pool1", ["relu2"],
                kernel_shape=[2, 2], strides=[2, 2]),
        conv_node("conv3a", m.conv3a, "pool1", inits),
        op_node("Relu", "relu3a", ["conv3a"]),
        conv_node("conv3b", m.conv3b, "pool1", inits),
        op_node("Relu", "relu3b", ["conv3b"]),
        op_node("Concat", "concat1", ["relu3a", "relu3b"], axis=1),
        conv_node("conv4", m.conv4, "concat1", inits),
        bn_node("bn4", m.bn4, "conv4", inits),
        op_node("Relu", "relu4", ["bn4"]),
        op_node("GlobalAveragePool", "gap", ["relu4"]),
        op_node("Flatten", "flatten", ["gap"], axis=1),
    ]
    inits += [_init("fc.weight", m.fc.weight), _init("fc.bias", m.fc.bias)]
    nodes.append(helper.make_node(
        "Gemm", ["flatten", "fc.weight", "fc.bias"], ["logits"], name="fc",
        alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["N", 10])],
        initializer=inits)
    onnx_model = helper.make_model(
        graph, producer_name="onnx_lapq/tools/make_digits_model.py",
        opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def ort_logits(model_bytes, x):
    sess = ort.InferenceSession(model_bytes,
                                providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


# ---------------------------------------------------------------- output

def save_npz(path, **arrays):
    """np.savez; byte-deterministic because zipfile stamps members written
    via ZipFile.open(name, "w") with the fixed 1980-01-01 ZipInfo date."""
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="models")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x, y = load_data()
    train, calib, heldout = split_indices(len(x), args.seed)
    model = train_model(x[train], y[train], args.seed)

    onnx_model = build_onnx(model)
    model_bytes = onnx_model.SerializeToString()
    got = ort_logits(model_bytes, x[heldout])
    diff = float(np.abs(got - torch_logits(model, x[heldout])).max())
    if diff >= 1e-4:
        raise SystemExit(f"ONNX/torch mismatch: max abs diff {diff:.3g}")
    acc = float((got.argmax(axis=1) == y[heldout]).mean())

    os.makedirs(args.out_dir, exist_ok=True)
    paths = {name: os.path.join(args.out_dir, name) for name in (
        "digits_cnn.onnx", "digits_cnn_calib.npz", "digits_cnn_heldout.npz")}
    with open(paths["digits_cnn.onnx"], "wb") as f:
        f.write(model_bytes)
    save_npz(paths["digits_cnn_calib.npz"], input=x[calib])
    save_npz(paths["digits_cnn_heldout.npz"],
             input=x[heldout], label=y[heldout])

    sizes = ", ".join(f"{n} {os.path.getsize(p)} B" for n, p in paths.items())
    print(f"held-out top-1 (onnxruntime) {acc:.4f} on {len(heldout)} images; "
          f"max |onnx-torch| {diff:.2e}; {sizes}")


if __name__ == "__main__":
    main()
