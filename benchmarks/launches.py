"""Where a forward pass spends its launches: operator counts per source function, and on a GPU
the CUDA kernels launched and the host-device synchronisations, for DUPS-Tiny (full, fixed
beta) and the peer Mask2Former Swin-T, on the same input.

At batch 1 a GPU is launch-bound (FACTS.md): latency follows the number of kernels and of the
host syncs that stop the CPU from queueing ahead, not FLOPs. This script says which of our
functions issue them.

    .venv/bin/python benchmarks/launches.py [--image-size 512] [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import device_name  # noqa: E402
from benchmarks.peer import swin_t_mask2former  # noqa: E402
from model import RatioPolicy  # noqa: E402
from model.segmentor import build_segmentor  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts every non-view operator that reaches a backend (on a GPU: one or more kernels),
    attributed to the innermost calling function of this project or of transformers."""

    def __init__(self):
        super().__init__()
        self.by_site: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.by_site[self._site()] += 1
        return out

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack(limit=40)):
            path = frame.filename
            if ("/model/" in path or "/transformers/" in path) and "benchmarks" not in path:
                return f"{Path(path).parent.name}/{Path(path).name}:{frame.name}"
        return "other"


def cuda_counts(fn) -> tuple[int, int]:
    """(kernels launched, host syncs) in one call of ``fn`` on the GPU."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(1 for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                       "cudaMemcpyAsync") and e.device_type.name == "CPU")
    return kernels, syncs


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    peer = swin_t_mask2former(150).eval().to(device)
    dups = build_segmentor("dups_tiny", 150).eval().to(device)
    runs = {
        "Mask2Former Swin-T": lambda: peer(pixel_values=image),
        "DUPS-Tiny fixed beta": lambda: dups(image, RatioPolicy.from_preset("fixed", "ade20k")),
        "DUPS-Tiny full": lambda: dups(image, RatioPolicy("full")),
    }
    print(f"{args.image_size}x{args.image_size}, batch 1, {device_name(device)}, fp32, eager")
    for name, fn in runs.items():
        fn()  # warm-up: lazy initialisation and caches
        counter = OpCounter()
        with counter:
            fn()
        line = f"{name}: {sum(counter.by_site.values())} operators"
        if device.type == "cuda":
            kernels, copies = cuda_counts(fn)
            line += f", {kernels} CUDA kernels, {copies} blocking syncs/copies"
        print(line)
        for site, count in counter.by_site.most_common(args.top):
            print(f"    {count:6d}  {site}")


if __name__ == "__main__":
    main()
