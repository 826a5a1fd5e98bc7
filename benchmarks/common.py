"""Timing, labelling and the attention-backend choice shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from dups.models.attention import BACKENDS, set_backend


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


def add_backend_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="attention backend preference (dups/models/attention.py)")


def with_backend(model: nn.Module, backend: str) -> nn.Module:
    """A copy of ``model`` (same weights) whose attention prefers ``backend``: the two side by side."""
    other = copy.deepcopy(model)
    set_backend(other, backend)
    return other
