"""Timing and labelling shared by the benchmark scripts."""
from __future__ import annotations

import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def time_ms(fn, device: torch.device, *args) -> float:
    """Wall time of one call of ``fn(*args)`` in ms, the GPU synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def cuda_graphed(fn, autocast_dtype: torch.dtype | None = None):
    """``fn`` (no arguments, static inputs) captured once as a CUDA graph: each call of the
    result replays all its kernels with no Python and no per-kernel launch cost, and returns
    the same output tensors, overwritten. This shows a model's latency with the launch cost
    removed (what torch.compile's "reduce-overhead" mode does, without the compiler)."""
    def run():
        with torch.no_grad(), torch.autocast("cuda", autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None, cache_enabled=False):
            return fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: lazy inits, cached constants, library handles
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()

    def replay():
        graph.replay()
        return out
    return replay
