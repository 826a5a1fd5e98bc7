"""The DeepSpeed engine from our config, and the process group it runs in.

DeepSpeed picks its CPU accelerator and gloo by itself on a machine without CUDA; on GPUs the
launcher brings an NCCL group. ZeRO stage, bf16 / fp32, gradient accumulation and clipping come
from the config; the optimiser is our own AdamW (parameter groups, schedule set per step).
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from dups.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """A one-rank process group for ``--launcher local`` (gloo on CPU, NCCL on GPU)."""
    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def collective_device(backend: str | None = None) -> torch.device:
    """Where tensors for a collective must live: NCCL takes only CUDA tensors (the rank's own
    device), gloo only CPU ones. ``backend``: the process group's, by default the current one."""
    if backend is None:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (itself without a process group), on its own device;
    the reduction itself runs on ``collective_device()``."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def deepspeed_config(cfg: Config) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.engine.zero_stage,
                              **({"stage3_param_persistence_threshold": cfg.engine.zero3_persist_below}
                                 if cfg.engine.zero_stage == 3 else {})},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg), dist_init_required=False)
    return engine


def input_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


def shutdown() -> None:
    """Ends the process group cleanly before the interpreter exits (a gloo thread that outlives
    Python's shutdown aborts the process otherwise)."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
