"""Parameters, FLOPs and token counts of a model on given inputs.

FLOPs follow the papers' convention (Mask2Former, DUPS Tables 2-4, fvcore): multiply-adds,
i.e. ``torch.utils.flop_counter`` total / 2. Every printed figure says so.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dups.models import RatioPolicy, build_encoder
from dups.models.attention import values_padded_on
from dups.models.segmentor import build_segmentor

TASKS = ("backbone", "segmentation")

FLOP_CONVENTION = "GFLOPs = multiply-adds (torch.utils.flop_counter total / 2, as fvcore)"


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's flop counter knows the CUDA attention kernels but not the fused CPU one, whose
# FLOPs it would silently count as zero.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


@contextlib.contextmanager
def flop_counter():
    """A ``FlopCounterMode`` that counts the model's own arithmetic, the same on every
    device (see ``count_gmacs``); ``.get_total_flops() / 2`` are multiply-adds."""
    with values_padded_on(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        yield counter


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs the project runs on.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops() -> float | None:
    """This process's GPU's dense bf16 peak, if it is one we know (else None)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def kernel_flop_counter() -> FlopCounterMode:
    """Counts the FLOPs of the kernels that actually run (no switch to padded values, so the
    numbers computed are unchanged): what a training step costs on this device."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


def count_gmacs(fn, *args, **kwargs) -> tuple[float, object]:
    """Multiply-adds (in G) of one call of ``fn``, and its result."""
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops() / 2 / 1e9, result


def policy_for(ratio: str, preset: str, random_ratio: float = 0.5) -> RatioPolicy:
    """CLI ratio names -> policies: full, fixed (beta_s), dynamic (eq. 1 at inference),
    random (``random_ratio`` of the tokens)."""
    if ratio not in ("full", "fixed", "dynamic", "random"):
        raise ValueError(f"unknown ratio {ratio!r}; choose full, fixed, dynamic or random")
    return RatioPolicy.from_preset(ratio, preset, random_ratio=random_ratio)


@dataclass
class Summary:
    model: str
    task: str
    image_size: int
    ratio: str
    preset: str
    num_classes: int
    params_backbone_m: float
    params_decoder_m: float
    params_total_m: float
    gflops: float
    tokens_per_stage: list[int]
    latency_ms: float
    flop_convention: str = FLOP_CONVENTION

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def summarize(model_name: str, image_size: int = 512, ratio: str = "full",
              preset: str = "ade20k", task: str = "segmentation", num_classes: int = 150,
              seed: int = 0) -> Summary:
    """Builds the named model (random weights) and measures it on one random image.
    ``task``: ``segmentation`` (DUPS + Mask2Former decoder) or ``backbone`` (encoder only)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    torch.manual_seed(seed)
    if task == "segmentation":
        model = build_segmentor(model_name, num_classes).eval()
        encoder = model.encoder
    else:
        model = encoder = build_encoder(model_name).eval()
    image = torch.randn(1, 3, image_size, image_size)
    policy = policy_for(ratio, preset)
    gmacs, out = count_gmacs(model, image, policy)
    start = time.perf_counter()
    model(image, policy)
    latency = (time.perf_counter() - start) * 1e3
    backbone, total = count_params(encoder) / 1e6, count_params(model) / 1e6
    return Summary(model_name, task, image_size, ratio, preset, num_classes, round(backbone, 3),
                   round(total - backbone, 3), round(total, 3), round(gmacs, 3),
                   out.tokens_per_stage, round(latency, 1))
