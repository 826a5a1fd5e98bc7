"""AdamW parameter groups and the learning-rate schedule (paper App. A, Mask2Former).

Backbone at ``lr``; decoder and upsampling blocks at ``lr x head_lr_mult``; weight decay on
weight matrices only (none on norms, biases, embeddings, position-bias coefficients).
WarmupPolyLR: linear warm-up from ``warmup_factor`` over ``warmup_iters``, then
``(1 - t/T) ** power``. Pre-training uses the same warm-up with a cosine decay.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dups.config import OptimConfig

NO_DECAY_NAMES = ("embed", "position_bias", "query_feat", "query_pos", "level_embed")


def is_head(name: str) -> bool:
    """Decoder and upsampling blocks get the larger learning rate."""
    return not name.startswith("encoder.") or ".upsample." in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not any(k in name for k in NO_DECAY_NAMES)
        groups.setdefault((is_head(name), decay), []).append(p)
    out = []
    for (head, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": cfg.lr * (cfg.head_lr_mult if head else 1.0),
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{'head' if head else 'backbone'}/{'decay' if decay else 'no_decay'}"})
    return out


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's base learning rate at ``step`` (0-based)."""
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    t = min(step / max(total, 1), 1.0)
    if cfg.schedule == "poly":
        decay = (1 - t) ** cfg.poly_power
    else:
        decay = 0.5 * (1 + math.cos(math.pi * t))
    return warm * decay


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, cfg: OptimConfig) -> float:
    f = lr_factor(step, total, cfg)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * f
    return f
