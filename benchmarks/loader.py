"""Can the loaders keep a GPU fed? Images/s per loader worker process for the two training
paths, against what a GPU's training step consumes, as the shipped configs run them.

    .venv/bin/python benchmarks/loader.py [--path both|finetune|pretrain] [--images 48] [--batches 12]

- fine-tuning (``dups/configs/_base_/finetune.yaml``: 4 workers per GPU, batch 8): ADE20K-sized
  JPEGs (683 x 512), random resize 0.5-2x, crop 512, flip, photometric distortion, score maps;
- pre-training (``dups/configs/_base_/pretrain_imagenet.yaml``: 8 workers per GPU, batch 64):
  ImageNet-sized JPEGs (500 x 375), RandomResizedCrop 224, flip, RandAugment
  rand-m9-mstd0.5-inc1, random erasing 0.25. Mixup / CutMix run on the training process's
  device on the collated batch, not in the workers; their cost on this CPU is printed apart.

Each worker count runs in its own DataLoader, start-up excluded. The GPU's demand is an
estimate, stated with its basis (``gpu_demand``): the H100's measured forward time of
DUPS-Tiny at 512x512, batch 8, bf16 (BENCHMARKS.md, "Where we stand: H100"), a training step
taken as 3x the forward (backward ~2x), and for pre-training scaled by the ratio of GFLOPs
per image (backbone at 224 against the segmentation model at 512, counted here).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dups.data.prep import prepare
from dups.data.synth import write_ade20k_layout
from dups.data.classification_aug import mix_batch
from dups.data.streams import load_manifest, shards_of, train_loader
from dups.evaluation.measure import summarize
from dups.tasks.classification import ClassificationTransform
from dups.tasks.segmentation import SegmentationTransform

H100_FORWARD_B8_MS = 49.1  # DUPS-Tiny fixed beta, 512x512, bf16 eager, batch 8 (BENCHMARKS.md)
STEP_OVER_FORWARD = 3.0  # forward + backward (~2x the forward); the optimizer step left out
PATHS = {  # workers per GPU and batch per GPU of the shipped configs
    "finetune": {"workers": 4, "batch": 8},
    "pretrain": {"workers": 8, "batch": 64},
}


def write_imagenet(root: Path, images: int, classes: int = 4) -> None:
    """Photo-like JPEGs of ImageNet's typical size (500 x 375) in its train layout."""
    rng = np.random.default_rng(0)
    for i in range(images):
        small = rng.integers(0, 255, (10, 13, 3), dtype=np.uint8)
        photo = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noise = rng.normal(0, 12, (375, 500, 3))
        photo = Image.fromarray(np.clip(np.asarray(photo) + noise, 0, 255).astype(np.uint8))
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.save(folder / f"img_{i:05d}.JPEG", quality=90)


def supply(shards, transform, batch: int, batches: int, workers: int) -> float:
    """Images/s that ``workers`` loader processes deliver (0: in this process)."""
    loader, _ = train_loader(shards, transform, batch, 0, 1, workers, 0, 64)
    it = iter(loader)
    next(it)  # start-up excluded
    ready = 2 * workers  # DataLoader's prefetch_factor per worker: made before the clock starts
    time.sleep(3.0 if workers else 0.0)  # let the queue fill: then the window counts what it made
    start = time.perf_counter()
    for _ in range(batches + ready):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    del it, loader
    return rate


def gpu_demand(path: str) -> float:
    """Estimated images/s one H100 consumes in a training step of the path (see the docstring)."""
    finetune = 8 / (H100_FORWARD_B8_MS * STEP_OVER_FORWARD / 1000)
    if path == "finetune":
        return finetune
    per_image = summarize("dups_tiny", 224, "fixed", "ade20k", "backbone", 1000).gflops
    segmentation = summarize("dups_tiny", 512, "fixed", "ade20k", "segmentation", 150).gflops
    return finetune * segmentation / per_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default="both", choices=["both", "finetune", "pretrain"])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts measured")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in (["finetune", "pretrain"] if args.path == "both" else [args.path]):
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "shards"
            if path == "finetune":
                write_ade20k_layout(src, args.images, 0, (512, 683))
                dataset, transform, batch = "ade20k", SegmentationTransform(512, (0.5, 2.0), True), 2
            else:
                write_imagenet(src, args.images)
                dataset, batch = "imagenet", 8
                transform = ClassificationTransform(224, "rand-m9-mstd0.5-inc1", 0.25)
            prepare(dataset, str(src), str(out), splits=("train",), shard_bytes=2_000_000, progress=False,
                    use_ray=False)
            shards = shards_of(str(out), load_manifest(str(out)), "train")
            rates = {w: supply(shards, transform, batch, args.batches, w) for w in args.workers}
        per_worker = rates[min(args.workers)] / min(args.workers)
        demand = gpu_demand(path)
        shipped = PATHS[path]
        print(f"{path}: " + ", ".join(f"{w} worker(s) {r:.1f} images/s" for w, r in rates.items())
              + f" -> {per_worker:.1f} images/s per worker on this CPU")
        print(f"  one H100's step consumes ~{demand:.0f} images/s (estimate); the shipped config's "
              f"{shipped['workers']} workers per GPU supply ~{per_worker * shipped['workers']:.0f} "
              f"= {per_worker * shipped['workers'] / demand:.2f}x (goal >= 1.5x), if they scale as measured")
        if path == "pretrain":
            images = torch.randn(shipped["batch"], 3, 224, 224)
            labels = torch.randint(0, 1000, (shipped["batch"],))
            start = time.perf_counter()
            for _ in range(5):
                mix_batch(images, labels, 1000, torch.Generator().manual_seed(0), 0.8, 1.0)
            print(f"  Mixup/CutMix of a batch of {shipped['batch']} on this CPU: "
                  f"{(time.perf_counter() - start) / 5 * 1000:.1f} ms (on the GPU in training)")


if __name__ == "__main__":
    main()
