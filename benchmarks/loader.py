"""Streaming loader throughput against what a training step consumes, on the same machine.

    .venv/bin/python benchmarks/loader.py [--images 32] [--crop 512] [--batch 2] [--model dups_tiny]

Prepares synthetic ADE20K-layout shards, measures the loader's images/s (decode, augment,
score maps) with 0, 1 and 2 worker processes, then the images/s of one training step
(forward + backward + AdamW) of the model at that crop; prints supply / demand.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep.job import prepare  # noqa: E402
from data_prep.synth import write_ade20k_layout  # noqa: E402
from model import RatioPolicy  # noqa: E402
from model.criterion import SegmentationCriterion  # noqa: E402
from model.segmentor import build_segmentor  # noqa: E402
from pipeline.data import load_manifest, shards_of, train_loader  # noqa: E402
from pipeline.train import _SegmentationTransform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--model", default="dups_tiny")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_ade20k_layout(Path(tmp) / "src", args.images, 0, (512, 683))
        prepare("ade20k", str(Path(tmp) / "src"), str(Path(tmp) / "shards"), splits=("train",),
                shard_bytes=2_000_000, progress=False, use_ray=False)
        shards = shards_of(str(Path(tmp) / "shards"), load_manifest(str(Path(tmp) / "shards")), "train")
        transform = _SegmentationTransform(args.crop, (0.5, 2.0), True)
        supply = {}
        for workers in (0, 1, 2):
            loader, _ = train_loader(shards, transform, args.batch, 0, 1, workers, 0, 64)
            it = iter(loader)
            next(it)  # start-up excluded
            t = time.perf_counter()
            for _ in range(args.batches):
                batch = next(it)
            supply[workers] = args.batches * args.batch / (time.perf_counter() - t)
            print(f"loader, {workers} worker(s): {supply[workers]:.1f} images/s")
            del it, loader
    torch.manual_seed(0)
    model = build_segmentor(args.model, 150).train()
    crit = SegmentationCriterion(150)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    policy = RatioPolicy.from_preset("dynamic", "ade20k")
    times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        out = model(batch["image"], policy)
        loss = crit(out.predictions, batch["label"], out.records, score_maps=batch["scores"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    demand = args.batch / (sum(times[1:]) / args.steps)
    print(f"training step, {args.model}, crop {args.crop}, batch {args.batch}: {demand:.2f} images/s "
          f"on {torch.get_num_threads()} CPU threads")
    for workers, rate in supply.items():
        print(f"supply / demand with {workers} loader worker(s): {rate / demand:.1f}x")


if __name__ == "__main__":
    main()
