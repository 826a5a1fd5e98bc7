"""Eq. 1 on a batch of images, packed (one forward, each stage padded to the batch's largest
budget) against one image at a time, side by side in one process: images/s of each, the
share of padding rows, and the largest difference between the two runs' probabilities.

Budgets come from ground-truth edge fractions of synthetic scenes (Table 7's oracle, the
preset's tau), so they differ from image to image as a trained head's do, with no checkpoint.

    .venv/bin/python benchmarks/packed.py --model dups_tiny --size 512 --batch 8 [--bucket 0.1]

``--compile [MODE]`` runs both through ``torch.compile`` (static shapes, nested graph breaks on:
one graph per block's budget read, four per forward; one by one then uses the bucket too, so
that it meets few shapes), the seconds of the first calls printed.

``--shapes N`` instead counts, over N scenes run one at a time, how many distinct shapes the
forward meets (one per combination of the three blocks' padded budgets: each is a graph to
compile or capture) with each bucket, and the padding that buys it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import add_backend_option, device_name, time_ms
from dups.models import RatioPolicy
from dups.models.edges import edge_scores
from dups.models.segmentor import build_segmentor, semantic_probabilities
from dups.data.synth import tensor_scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dups_tiny")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bucket", type=float, default=0.0, help="RatioPolicy.bucket of the packed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="ade20k")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    ap.add_argument("--shapes", type=int, default=0, help="count forward shapes over N scenes instead")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    choices=["default", "reduce-overhead", "max-autotune"], help="torch.compile both runs")
    add_backend_option(ap)
    args = ap.parse_args()
    if args.shapes:
        return count_shapes(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_segmentor(args.model, encoder={"attention_backend": args.backend}).eval().to(device)
    images, labels = tensor_scenes(args.batch, size=args.size, seed=1)
    maps = {p: m.to(device) for p, m in edge_scores(labels).items()}
    images = images.to(device)
    if args.bf16:
        model.to(torch.bfloat16)
        images = images.to(torch.bfloat16)
    alone = RatioPolicy.from_preset("per_image", args.preset, bucket=args.bucket if args.compile else 0.0)
    packed = RatioPolicy.from_preset("per_image", args.preset, bucket=args.bucket)
    size = images.shape[-2:]
    forward = torch.compile(model, mode=args.compile, dynamic=False) if args.compile else model

    def one_by_one():
        return torch.cat([semantic_probabilities(forward(images[i:i + 1], alone, {p: m[i:i + 1] for p, m in
                                                                               maps.items()}).final, size)
                          for i in range(len(images))])

    def together():
        out = forward(images, packed, maps)
        together.records = out.records
        return semantic_probabilities(out.final, size)

    nested = getattr(torch._dynamo.config, "nested_graph_breaks", None) is not None
    with torch.no_grad(), torch._dynamo.config.patch(**({"nested_graph_breaks": True} if nested else {})):
        start = time.perf_counter()
        diff = float((one_by_one().float() - together().float()).abs().max())
        if args.compile:
            print(f"compiled ({args.compile}, nested graph breaks {'on' if nested else 'unavailable'}): "
                  f"first calls {time.perf_counter() - start:.0f} s")
        times = {name: [time_ms(fn, device) for _ in range(args.repeats)]
                 for name, fn in (("one by one", one_by_one), ("packed", together))}
    rows = sum(r.selected.numel() for r in together.records)
    padding = sum(int((~r.chosen).sum()) for r in together.records) / max(rows, 1)
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, eq. 1 on oracle budgets "
          f"({args.preset}), bucket {args.bucket}, {device_name(device)}, "
          f"{'bf16 weights' if args.bf16 else 'fp32'}, attention {args.backend}")
    print("children per block and image: " + " | ".join(
        "/".join(str(int(c)) for c in (4 * r.chosen.sum(1)).tolist()) for r in together.records))
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"{name:>11}: {ms:8.1f} ms per batch, {1e3 * args.batch / ms:6.2f} images/s")
    ratio = statistics.median(times["packed"]) / statistics.median(times["one by one"])
    print(f"packed / one by one: {ratio:.2f}x the time; padding {padding:.1%} of the split "
          f"rows; max |probability difference| {diff:.2e}")


@torch.no_grad()
def count_shapes(args) -> None:
    """Distinct (padded budget per block) signatures over ``args.shapes`` scenes, per bucket."""
    device = torch.device(args.device)
    model = build_segmentor(args.model).eval().to(device)
    images, labels = tensor_scenes(args.shapes, size=args.size, seed=2)
    maps = edge_scores(labels)
    print(f"{args.model} {args.size}x{args.size}, {args.shapes} scenes one at a time, eq. 1 on oracle budgets "
          f"({args.preset}), {device_name(device)}")
    print(f"{'bucket':>7}{'shapes':>8}  padding (rows past the budget, % of the real split rows)")
    for bucket in (0.0, 0.05, 0.1, 0.25):
        policy = RatioPolicy.from_preset("per_image", args.preset, bucket=bucket)
        shapes, padded, real = set(), 0, 0
        for i in range(args.shapes):
            out = model.encoder(images[i:i + 1].to(device), policy,
                                {p: m[i:i + 1].to(device) for p, m in maps.items()})
            shapes.add(tuple(r.selected.shape[1] for r in out.records))
            for r in out.records:
                chosen = len(r.of_image(0)[2])
                real, padded = real + chosen, padded + r.selected.shape[1] - chosen
        print(f"{bucket:>7g}{len(shapes):>8}  {100 * padded / max(real, 1):.1f}%")


if __name__ == "__main__":
    main()
