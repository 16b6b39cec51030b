"""Peak memory of onnx_lapq's calibration as the calibration set grows (streamed from a generator).

    python tools/calib_memory.py --kit ../shared/kit [--model squeezenet1.1] [--sizes 256,1000]

For each size, a fresh subprocess quantizes the kit model at W8A8 (minmax) with
calibration images decoded one batch at a time by a Python generator, so the data set
itself is never all in memory; the subprocess reports its own peak RSS (VmHWM).  The
growth between sizes is what matters: streaming statistics keep it flat.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _worker(kit: str, model_key: str, size: int, batch: int) -> dict:
    import numpy as np
    import onnx
    from PIL import Image

    sys.path.insert(0, kit)
    import eval as kit_eval  # the kit's reference preprocessing

    import onnx_lapq

    spec = kit_eval.MODELS[model_key]
    folder = os.path.join(kit, "data", "imagenet")
    with open(os.path.join(folder, "eli1000_224_labels.csv")) as fh:
        files = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:size]]

    def batches():
        for start in range(0, len(files), batch):
            images = np.stack([np.asarray(Image.open(os.path.join(folder, "eli1000_224", f)).convert("RGB")) for f in files[start:start + batch]])
            yield {onnx_model.graph.input[0].name: kit_eval.preprocess(images, spec)}

    onnx_model = onnx.load(os.path.join(kit, spec["path"]))
    started = time.perf_counter()
    result = onnx_lapq.quantize(onnx_model, batches(), config=onnx_lapq.QuantConfig(batch_size=batch))
    return {
        "model": model_key, "samples": result.report["calibration_samples"], "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kit"))
    parser.add_argument("--model", default="squeezenet1.1")
    parser.add_argument("--sizes", default="256,1000")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(os.path.abspath(args.kit), args.model, args.worker, args.batch)))
        return
    rows = []
    for size in map(int, args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--kit", args.kit, "--model", args.model, "--batch", str(args.batch), "--worker", str(size)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    print(f"peak RSS {first:.0f} MB at {rows[0]['samples']} samples -> {last:.0f} MB at {rows[-1]['samples']} ({100 * (last / first - 1):+.1f}%)")


if __name__ == "__main__":
    main()
