#!/usr/bin/env python3
"""The calibration loss of exported models over a whole calibration file, as the search measures it.

    python tools/calib_loss.py FLOAT.onnx CALIB.npz QUANTIZED.onnx [QUANTIZED.onnx ...] [--loss auto]

For each quantized model: the mean distance (distance.py's, ``auto`` resolved as the search
resolves it: kl for classifiers) between its first output and the float model's over every
sample of CALIB.npz, in batches of 32, through plain ONNX Runtime sessions (all
optimizations).  A bench row's quantized model and its calibration file (OUT/cache) check a
mixed-precision accuracy bound against the exported model: the run's own fidelity figure
covers only the first calibration samples.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import onnx

from onnx_lapq.fidelity import measure
from onnx_lapq.graph import normalize
from onnx_lapq.runtime import session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model")
    parser.add_argument("calib")
    parser.add_argument("quantized", nargs="+")
    parser.add_argument("--loss", default="auto")
    args = parser.parse_args()
    reference = normalize(onnx.load(args.float_model))
    data = np.load(args.calib)
    inputs = {i.name for i in reference.graph.input}
    count = len(data[data.files[0]])
    batches = [{k: data[k][i:i + 32] for k in data.files if k in inputs} for i in range(0, count, 32)]
    for path in args.quantized:
        fidelity = measure(reference, session(onnx.load(path)), batches, args.loss)
        print(json.dumps({"model": path, "samples": fidelity.samples, "loss_kind": fidelity.loss_kind, "loss": fidelity.loss}))


if __name__ == "__main__":
    main()
