"""Cost of full vs fixed-beta vs dynamic vs random-50% upsampling, measured side by side: the
backbone (default) or the whole segmentation model (``--task segmentation``).

Same weights, same input, policies interleaved round by round; prints GFLOPs (multiply-adds,
flop_counter / 2), tokens per stage, median latency, and each policy's ratio to full.
"dynamic (oracle)" is eq. 1 with the ground-truth edge fractions of a synthetic scene in
place of a trained score head (Table 7's oracle): the token counts a well-trained head
would give on an image with that much boundary.

    .venv/bin/python benchmarks/backbone.py --model dups_tiny --image-size 512 --repeats 5
    .venv/bin/python benchmarks/backbone.py --task segmentation
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from common import device_name, time_ms
from dups.data.synth import _palette, scene
from dups.models import RatioPolicy, build_encoder
from dups.models.edges import edge_scores
from dups.models.segmentor import build_segmentor, semantic_probabilities
from dups.evaluation.measure import FLOP_CONVENTION, count_gmacs


def policies(preset: str) -> dict[str, RatioPolicy]:
    return {
        "full": RatioPolicy("full"),
        f"fixed beta ({preset})": RatioPolicy.from_preset("fixed", preset),
        "dynamic (oracle)": RatioPolicy.from_preset("per_image", preset),
        "random 50%": RatioPolicy("random", random_ratio=0.5),
    }


def scene_oracle(size: int, batch: int, device) -> dict[int, torch.Tensor]:
    """Edge fractions of ``batch`` copies of one synthetic scene's label map."""
    rng = np.random.default_rng(0)
    _, label = scene(rng, size, size, _palette(rng, 8))
    maps = edge_scores(torch.from_numpy(label.astype(np.int64))[None])
    return {s: m.expand(batch, -1, -1).to(device) for s, m in maps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dups_tiny")
    ap.add_argument("--task", default="backbone", choices=["backbone", "segmentation"])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--preset", default="ade20k")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_encoder(args.model) if args.task == "backbone" else build_segmentor(args.model)
    model = model.eval().to(device)
    image = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    pols = policies(args.preset)
    oracle = scene_oracle(args.image_size, args.batch, device)

    def run(policy):
        torch.manual_seed(1)  # the same random selection every round
        maps = oracle if policy.kind == "per_image" else None
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            out = model(image, policy, maps)
            return out.tokens_per_stage

    stats = {}
    for name, pol in pols.items():
        gmacs, out = count_gmacs(run, pol)
        run(pol)  # warm-up
        stats[name] = {"gflops": gmacs / args.batch, "tokens": out, "ms": []}
    for _ in range(args.repeats):
        for name, pol in pols.items():
            stats[name]["ms"].append(time_ms(run, device, pol))

    print(f"{args.model} {args.task}, {args.image_size}x{args.image_size}, batch {args.batch}, "
          f"{device_name(device)}, {'bf16' if args.bf16 else 'fp32'}, median of {args.repeats}")
    print(f"[{FLOP_CONVENTION}; per image]")
    print(f"{'policy':<24}{'GFLOPs':>9}{'x full':>8}{'ms':>10}{'x full':>8}  tokens per stage")
    full = stats["full"]
    full_ms = statistics.median(full["ms"])
    for name, s in stats.items():
        ms = statistics.median(s["ms"])
        print(f"{name:<24}{s['gflops']:>9.2f}{s['gflops'] / full['gflops']:>8.3f}"
              f"{ms:>10.1f}{ms / full_ms:>8.3f}  {' / '.join(map(str, s['tokens']))}")
    if args.task == "segmentation":  # the same for every policy: queries x classes x H x W
        with torch.no_grad():
            out = model(image[:1], pols["full"])
            extra, _ = count_gmacs(semantic_probabilities, out.final, image.shape[-2:])
        print(f"the semantic inference (class x mask per pixel, which evaluation and the papers' "
              f"whole-network counts include) adds {extra:.2f} GFLOPs per image to each policy")


if __name__ == "__main__":
    main()
