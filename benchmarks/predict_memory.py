"""Peak memory and time of predicting one large photo: at its own size against the evaluation
size (``--short-side``, what ``dups predict`` runs by default), side by side, each in a fresh
process so that its peak is its own.

    .venv/bin/python benchmarks/predict_memory.py [--size 4000x3000] [--short-side 512] [--model dups_demo]

Random weights: memory and time do not depend on them (the ratio policy is the model's
default, dynamic, so the token counts are those of an untrained head; a trained one selects
fewer).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from dups.apis.inference import inference_model
from dups.models.segmentor import build_segmentor
width, height, short, name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = build_segmentor(name, 150).eval()
rng = np.random.default_rng(0)
small = rng.integers(0, 255, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8)
photo = np.kron(small, np.ones((50, 50, 1), dtype=np.uint8))[:height, :width]  # blocks: edges to split
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
label = inference_model(model, photo, short_side=short)
seconds = time.perf_counter() - start
assert tuple(label.shape) == (height, width)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mib": base / 1024, "seconds": seconds}))
"""


def measure(width: int, height: int, short: int, model: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(width), str(height), str(short), model],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photo")
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--model", default="dups_demo")
    args = ap.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    own = measure(width, height, 0, args.model)
    bounded = measure(width, height, args.short_side, args.model)
    print(f"{args.model}, one {width}x{height} photo, CPU, peak resident memory and time of model.predict:")
    print(f"  own size        {own['peak_mib']:8.0f} MiB {own['seconds']:7.1f} s")
    print(f"  short side {args.short_side:<4} {bounded['peak_mib']:8.0f} MiB {bounded['seconds']:7.1f} s")
    print(f"  ratio           {bounded['peak_mib'] / own['peak_mib']:8.2f}x   {bounded['seconds'] / own['seconds']:6.2f}x"
          f"  (process at rest before: {own['before_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
