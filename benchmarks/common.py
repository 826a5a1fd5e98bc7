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
