"""Eq. 1 on a batch of images, packed (one forward, each stage padded to the batch's largest
budget) against one image at a time, side by side in one process: images/s of each, the
share of padding rows, and the largest difference between the two runs' probabilities.

Budgets come from ground-truth edge fractions of synthetic scenes (Table 7's oracle, the
preset's tau), so they differ from image to image as a trained head's do, with no checkpoint.

    .venv/bin/python benchmarks/packed.py --model dups_tiny --size 512 --batch 8 [--bucket 0.1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchmarks.common import device_name, time_ms  # noqa: E402
from model import RatioPolicy  # noqa: E402
from model.edges import edge_scores  # noqa: E402
from model.segmentor import build_segmentor, semantic_probabilities  # noqa: E402
from synthetic import scenes  # noqa: E402


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
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_segmentor(args.model).eval().to(device)
    images, labels = scenes(args.batch, size=args.size, seed=1)
    maps = {p: m.to(device) for p, m in edge_scores(labels).items()}
    images = images.to(device)
    if args.bf16:
        model.to(torch.bfloat16)
        images = images.to(torch.bfloat16)
    alone = RatioPolicy.from_preset("per_image", args.preset)
    packed = RatioPolicy.from_preset("per_image", args.preset, bucket=args.bucket)
    size = images.shape[-2:]

    def one_by_one():
        return torch.cat([semantic_probabilities(model(images[i:i + 1], alone, {p: m[i:i + 1] for p, m in
                                                                               maps.items()}).final, size)
                          for i in range(len(images))])

    def together():
        out = model(images, packed, maps)
        together.records = out.records
        return semantic_probabilities(out.final, size)

    with torch.no_grad():
        diff = float((one_by_one().float() - together().float()).abs().max())
        times = {name: [time_ms(fn, device) for _ in range(args.repeats)]
                 for name, fn in (("one by one", one_by_one), ("packed", together))}
    rows = sum(r.selected.numel() for r in together.records)
    padding = sum(int((~r.chosen).sum()) for r in together.records) / max(rows, 1)
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, eq. 1 on oracle budgets "
          f"({args.preset}), bucket {args.bucket}, {device_name(device)}, "
          f"{'bf16 weights' if args.bf16 else 'fp32'}")
    print("children per block and image: " + " | ".join(
        "/".join(str(int(c)) for c in (4 * r.chosen.sum(1)).tolist()) for r in together.records))
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"{name:>11}: {ms:8.1f} ms per batch, {1e3 * args.batch / ms:6.2f} images/s")
    ratio = statistics.median(times["packed"]) / statistics.median(times["one by one"])
    print(f"packed / one by one: {ratio:.2f}x the time; padding {padding:.1%} of the split "
          f"rows; max |probability difference| {diff:.2e}")


if __name__ == "__main__":
    main()
