"""Training memory, the paper's protocol (Table 6): after 20 warm-up steps, the per-step peak
allocated memory over 20 steps (counter reset and device synchronised each step), at 1024x1024,
for batch 1/2/4/8; DUPS-Tiny with dynamic ratios (Cityscapes presets) and with full upsampling,
side by side. GPU only (``--device cpu --size 128 --steps 2`` only checks that it runs).

    .venv/bin/python benchmarks/memory.py [--batches 1 2 4 8] [--bf16] [--backend auto]

``--saved-by torch fused`` instead counts, on any device, the bytes autograd keeps for the
backward pass of one training forward (each storage once, parameters left out: the
activations that set training's peak), full upsampling and fixed beta, with each attention
backend side by side: the fused kernel keeps no gathered copies of the keys and values.
"""
from __future__ import annotations

import argparse

import torch

from common import add_backend_option, device_name
from dups.models import RatioPolicy
from dups.models.attention import set_backend
from dups.models.criterion import SegmentationCriterion
from dups.models.segmentor import build_segmentor


def labels_with_masks(batch: int, size: int, masks: int, device) -> torch.Tensor:
    """Label maps with ``masks`` classes in vertical bands plus a disc (real boundaries)."""
    lab = torch.zeros(batch, size, size, dtype=torch.long, device=device)
    band = size // masks
    for i in range(masks):
        lab[:, :, i * band:(i + 1) * band] = i
    yy, xx = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    lab[:, (yy - size // 3) ** 2 + (xx - size // 2) ** 2 < (size // 8) ** 2] = masks - 1
    return lab


def training_inputs(batch: int, size: int, device) -> tuple[SegmentationCriterion, torch.Tensor, torch.Tensor]:
    """The criterion, random images and label maps with 6 masks of one training batch."""
    crit = SegmentationCriterion(19).to(device)
    return crit, torch.randn(batch, 3, size, size, device=device), labels_with_masks(batch, size, 6, device)


def measure(model, policy, batch, size, steps, warmup, device, bf16) -> tuple[float, float]:
    crit, images, labels = training_inputs(batch, size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    peaks = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model(images, policy)
            loss = crit(out.predictions, labels, out.records)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            if step >= warmup:
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    return (max(peaks), sum(peaks) / len(peaks)) if peaks else (float("nan"), float("nan"))


def saved_for_backward(model, policy, batch, size, device, bf16) -> float:
    """GiB of the tensors autograd saves in one training forward + loss (each storage once; the
    parameters themselves, which training holds anyway, left out)."""
    crit, images, labels = training_inputs(batch, size, device)
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        out = model(images, policy)
        crit(out.predictions, labels, out.records)["loss"]
    return sum(storages.values()) / 2**30


def compare_saved(args, device) -> None:
    print(f"{args.size}x{args.size}, batch {args.batches[0]}, {device_name(device)}, "
          f"{'bf16' if args.bf16 else 'fp32'}; GiB of activations saved for the backward pass of one training forward")
    torch.manual_seed(0)
    model = build_segmentor("dups_tiny", 19).to(device).train()
    for name, policy in (("full", RatioPolicy("full")), ("fixed beta", RatioPolicy.from_preset("fixed", "cityscapes"))):
        saved = {}
        for backend in args.saved_by:
            set_backend(model, backend)
            saved[backend] = saved_for_backward(model, policy, args.batches[0], args.size, device, args.bf16)
        first = args.saved_by[0]
        print(f"{name:>11}: " + ", ".join(f"{b} {g:.3f} ({g / saved[first]:.2f}x {first})" for b, g in saved.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--bf16", action="store_true")
    add_backend_option(ap)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--saved-by", nargs="+", default=None, metavar="BACKEND",
                    help="count the bytes saved for backward with each attention backend instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.saved_by:
        return compare_saved(args, device)
    if device.type != "cuda":
        print("peak allocated memory is a CUDA measurement: run this on a GPU (CPU run checks the code only)")
    print(f"{args.size}x{args.size}, {device_name(device)}, "
          f"{'bf16' if args.bf16 else 'fp32'}, attention {args.backend}; GiB max / mean of per-step peaks over {args.steps} steps")
    print(f"{'batch':>6}{'dynamic max':>13}{'mean':>8}{'full max':>10}{'mean':>8}{'full/dyn':>10}")
    for batch in args.batches:
        row = []
        for policy in (RatioPolicy.from_preset("dynamic", "cityscapes"), RatioPolicy("full")):
            torch.manual_seed(0)
            model = build_segmentor("dups_tiny", 19, encoder={"attention_backend": args.backend})
            model = model.to(device).train()
            try:
                row.append(measure(model, policy, batch, args.size, args.steps, args.warmup, device, args.bf16))
            except torch.OutOfMemoryError:
                row.append((float("inf"), float("inf")))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        (dmax, dmean), (fmax, fmean) = row
        print(f"{batch:>6}{dmax:>13.2f}{dmean:>8.2f}{fmax:>10.2f}{fmean:>8.2f}{fmax / dmax:>10.2f}")


if __name__ == "__main__":
    main()
