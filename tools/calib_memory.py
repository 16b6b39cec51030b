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


TEXT_MODEL = "all-MiniLM-L6-v2"


def _text_batches(kit: str, size: int, batch: int, seq_len: int):
    """(model path, generator of {input_ids, attention_mask} batches of STS-B dev sentences)."""
    import numpy as np

    sys.path.insert(0, kit)
    import eval_sts  # the kit's reference tokenizer

    encode = eval_sts.make_encoder(os.path.join(kit, "models", "text", "all-MiniLM-L6-v2_tokenizer"))
    dev = eval_sts.read_sts(os.path.join(kit, "data", "stsb", "sts-dev.csv"))
    sentences = list(dict.fromkeys(s for _, a, b in dev for s in (a, b)))[:size]

    def batches():
        for start in range(0, len(sentences), batch):
            ids = np.zeros((len(sentences[start:start + batch]), seq_len), np.int64)
            for row, text in enumerate(sentences[start:start + batch]):
                tokens = encode(text)[:seq_len]
                ids[row, :len(tokens)] = tokens
            yield {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}

    return os.path.join(kit, "models", "text", "all-MiniLM-L6-v2_fp32.onnx"), batches()


def _image_batches(kit: str, model_key: str, size: int, batch: int):
    """(model path, generator of preprocessed eli1000 image batches)."""
    import numpy as np
    import onnx
    from PIL import Image

    sys.path.insert(0, kit)
    import eval as kit_eval  # the kit's reference preprocessing

    spec = kit_eval.MODELS[model_key]
    folder = os.path.join(kit, "data", "imagenet")
    with open(os.path.join(folder, "eli1000_224_labels.csv")) as fh:
        files = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:size]]

    def batches():
        for start in range(0, len(files), batch):
            images = np.stack([np.asarray(Image.open(os.path.join(folder, "eli1000_224", f)).convert("RGB")) for f in files[start:start + batch]])
            yield {input_name: kit_eval.preprocess(images, spec)}

    path = os.path.join(kit, spec["path"])
    input_name = onnx.load(path, load_external_data=False).graph.input[0].name
    return path, batches()


def _worker(kit: str, model_key: str, size: int, batch: int, seq_len: int) -> dict:
    import onnx

    import onnx_lapq

    if model_key == TEXT_MODEL:
        path, batches = _text_batches(kit, size, batch, seq_len)
    else:
        path, batches = _image_batches(kit, model_key, size, batch)
    started = time.perf_counter()
    result = onnx_lapq.quantize(onnx.load(path), batches, config=onnx_lapq.QuantConfig(batch_size=batch))
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
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM: tokens per sentence (padded or cut)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(os.path.abspath(args.kit), args.model, args.worker, args.batch, args.seq_len)))
        return
    rows = []
    for size in map(int, args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--kit", args.kit, "--model", args.model, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--worker", str(size)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    print(f"peak RSS {first:.0f} MB at {rows[0]['samples']} samples -> {last:.0f} MB at {rows[-1]['samples']} ({100 * (last / first - 1):+.1f}%)")


if __name__ == "__main__":
    main()
