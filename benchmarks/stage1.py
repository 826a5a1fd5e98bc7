"""Stage 1 as global attention (the default: the paper's lightweight ViT) against natten's
7 x 7 window: parameters, GFLOPs and median latency of the whole segmentation model, same
weights and input, the two interleaved round by round.

    .venv/bin/python benchmarks/stage1.py --model dups_tiny --image-size 512 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import device_name, time_ms
from dups.models import RatioPolicy
from dups.models.segmentor import build_segmentor
from dups.evaluation.measure import FLOP_CONVENTION, count_gmacs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dups_tiny")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {kind: build_segmentor(args.model, 150, {"stage1_attention": kind}).eval().to(device)
              for kind in ("global", "window")}
    models["window"].load_state_dict(models["global"].state_dict())  # the same weights
    image = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    policy = RatioPolicy("full")
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(image, policy)
        for _ in range(args.repeats):
            for kind, m in models.items():
                times[kind].append(time_ms(lambda: m(image, policy), device))
    print(f"{args.model}, {args.image_size}x{args.image_size}, full upsampling, {device_name(device)}, "
          f"fp32, batch 1, median of {args.repeats} [{FLOP_CONVENTION}]")
    base = statistics.median(times["global"])
    for kind, m in models.items():
        params = sum(p.numel() for p in m.parameters()) / 1e6
        gmacs, _ = count_gmacs(m, image, policy)
        ms = statistics.median(times[kind])
        print(f"stage 1 {kind:<7} params {params:.2f} M  GFLOPs {gmacs:.3f}  latency {ms:.0f} ms "
              f"({ms / base:.2f}x global)")


if __name__ == "__main__":
    main()
