"""Top-1 accuracy of a digits model (float or quantized) on the shipped held-out split.

    python tools/eval_digits.py models/digits_cnn.onnx [more.onnx ...]

Runs each model in ONNX Runtime (CPU, all optimizations) on models/digits_cnn_heldout.npz.
"""
import argparse
import pathlib

import numpy as np
import onnxruntime as ort

HELDOUT = pathlib.Path(__file__).resolve().parents[1] / "models" / "digits_cnn_heldout.npz"


def top1(path: str, heldout: pathlib.Path = HELDOUT) -> float:
    data = np.load(heldout)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["label"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    for path in parser.parse_args().models:
        print(f"{path}: top-1 {100 * top1(path):.2f}% on {HELDOUT.name}")


if __name__ == "__main__":
    main()
