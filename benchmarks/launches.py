"""Where a forward pass spends its launches: operator counts per source function, and on a GPU
the CUDA kernels launched and the host-device synchronisations, for DUPS-Tiny (full, fixed
beta) and the peer Mask2Former Swin-T, on the same input.

At batch 1 a GPU is launch-bound (FACTS.md): latency follows the number of kernels and of the
host syncs that stop the CPU from queueing ahead, not FLOPs. This script says which of our
functions issue them.

    .venv/bin/python benchmarks/launches.py [--image-size 512] [--top 12] [--bf16]
        [--models peer fixed full fused] [--compile]

``--compile`` profiles each model compiled by inductor instead (mode "default", so its fused
kernels are launched one by one and visible). On a GPU: kernels per forward, the GPU's busy
time (the sum of kernel durations, against the forward's wall time) and the kernels that take
it, which splits a compiled batch-1 latency into launch gaps and kernel time. On a CPU: the
compiled forward's launches, inductor's fused kernels and the library calls it keeps (GEMMs,
attention), which is how many kernels the same fusion leaves for a GPU to launch.
"""
from __future__ import annotations

import argparse
import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import device_name, time_ms, with_backend
from peer import swin_t_mask2former
from dups.models import RatioPolicy
from dups.models.segmentor import build_segmentor


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
            if ("/dups/models/" in path or "/transformers/" in path) and "benchmarks" not in path:
                return f"{Path(path).parent.name}/{Path(path).name}:{frame.name}"
        return "other"


def compiled_launches(fn) -> tuple[int, collections.Counter]:
    """(inductor's fused kernels, library calls per operator) in one call of a compiled ``fn``
    on the CPU: the direct children of the compiled graph's call in the profile (needs
    ``torch._inductor.config.cpp.enable_kernel_profile`` set before compiling)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls = [e.name for e in prof.events()
             if e.cpu_parent is not None and e.cpu_parent.name.startswith("## Call CompiledFxGraph")]
    fused = sum(1 for name in calls if "cpp_fused" in name)
    return fused, collections.Counter(name for name in calls if name.startswith("aten::"))


def cuda_counts(fn) -> tuple[int, int, float, collections.Counter]:
    """(kernels launched, host syncs, GPU busy ms, busy microseconds per kernel name) in one
    call of ``fn`` on the GPU."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy: collections.Counter = collections.Counter()
    for e in kernels:
        busy[e.name[:90]] += e.time_range.elapsed_us()
    syncs = sum(1 for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                       "cudaMemcpyAsync") and e.device_type.name == "CPU")
    return len(kernels), syncs, sum(busy.values()) / 1e3, busy


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--models", nargs="+", choices=["peer", "fixed", "full", "fused"],
                    default=["peer", "fixed", "full"],
                    help="fused: fixed beta with the clustered attention in the Triton kernel (CUDA)")
    ap.add_argument("--compile", action="store_true", help="profile inductor-compiled models (GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.compile and device.type == "cpu":
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True  # fused kernels in the profile
    torch.manual_seed(0)
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    peer = swin_t_mask2former(150).eval().to(device) if "peer" in args.models else None
    dups = build_segmentor("dups_tiny", 150).eval().to(device)
    fused = with_backend(dups, "fused") if "fused" in args.models else None
    if args.compile:
        peer = torch.compile(peer, dynamic=False) if peer is not None else None
        dups = torch.compile(dups, dynamic=False)
        fused = torch.compile(fused, dynamic=False) if fused is not None else None
    runs = {
        "Mask2Former Swin-T": ("peer", lambda: peer(pixel_values=image)),
        "DUPS-Tiny fixed beta": ("fixed", lambda: dups(image, RatioPolicy.from_preset("fixed", "ade20k"))),
        "DUPS-Tiny full": ("full", lambda: dups(image, RatioPolicy("full"))),
        "DUPS-Tiny fixed, fused": ("fused", lambda: fused(image, RatioPolicy.from_preset("fixed", "ade20k"))),
    }
    how = "compiled (inductor, default mode)" if args.compile else "eager"
    print(f"{args.image_size}x{args.image_size}, batch 1, {device_name(device)}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {how}")
    for name, (key, fn) in runs.items():
        if key not in args.models:
            continue
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            fn(), fn()  # warm-up: lazy initialisation, caches, compilation
            parts, sites = [], collections.Counter()
            if not args.compile:  # compiled code runs below the dispatcher's Python modes
                counter = OpCounter()
                with counter:
                    fn()
                parts, sites = [f"{sum(counter.by_site.values())} operators"], counter.by_site
            if args.compile and device.type == "cpu":
                fused, library = compiled_launches(fn)
                parts = [f"{fused + sum(library.values())} launches: {fused} fused kernels + "
                         f"{sum(library.values())} library calls"]
                sites = library
            if device.type == "cuda":
                wall = min(time_ms(fn, device) for _ in range(5))
                kernels, copies, busy, by_kernel = cuda_counts(fn)
                parts += [f"{kernels} CUDA kernels", f"GPU busy {busy:.2f} ms of {wall:.2f} ms wall "
                          f"({busy / wall:.0%})", f"{copies} blocking syncs/copies"]
                if args.compile:
                    sites = collections.Counter({k: round(v) for k, v in by_kernel.items()})
        line = f"{name}: {', '.join(parts)}"
        print(line)
        unit = "us GPU" if args.compile and device.type == "cuda" else ""
        for site, count in sites.most_common(args.top):
            print(f"    {count:6d}{unit}  {site}")


if __name__ == "__main__":
    main()
