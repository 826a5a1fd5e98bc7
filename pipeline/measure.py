"""Parameters, FLOPs and token counts of a model on given inputs.

FLOPs follow the papers' convention (Mask2Former, DUPS Tables 2-4, fvcore): multiply-adds,
i.e. ``torch.utils.flop_counter`` total / 2. Every printed figure says so.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model import RatioPolicy, build_encoder

FLOP_CONVENTION = "GFLOPs = multiply-adds (torch.utils.flop_counter total / 2, as fvcore)"


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_gmacs(fn, *args, **kwargs) -> tuple[float, object]:
    """Multiply-adds (in G) of one call of ``fn``, and its result."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops() / 2 / 1e9, result


def policy_for(ratio: str, preset: str, random_ratio: float = 0.5) -> RatioPolicy:
    """CLI ratio names -> policies: full, fixed (beta_s), dynamic (eq. 1 at inference),
    random (``random_ratio`` of the tokens)."""
    kinds = {"full": "full", "fixed": "fixed", "dynamic": "dynamic", "random": "random"}
    if ratio not in kinds:
        raise ValueError(f"unknown ratio {ratio!r}; choose one of {sorted(kinds)}")
    return RatioPolicy.from_preset(kinds[ratio], preset, random_ratio=random_ratio)


@dataclass
class Summary:
    model: str
    image_size: int
    ratio: str
    preset: str
    params_backbone_m: float
    gflops: float
    tokens_per_stage: list[int]
    latency_ms: float
    flop_convention: str = FLOP_CONVENTION

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def summarize(model_name: str, image_size: int = 512, ratio: str = "full",
              preset: str = "ade20k", seed: int = 0) -> Summary:
    """Builds the named model (random weights) and measures it on one random image."""
    torch.manual_seed(seed)
    encoder = build_encoder(model_name).eval()
    image = torch.randn(1, 3, image_size, image_size)
    policy = policy_for(ratio, preset)
    gmacs, out = count_gmacs(encoder, image, policy)
    start = time.perf_counter()
    encoder(image, policy)
    latency = (time.perf_counter() - start) * 1e3
    return Summary(model_name, image_size, ratio, preset, count_params(encoder) / 1e6,
                   round(gmacs, 3), out.tokens_per_stage, round(latency, 1))
