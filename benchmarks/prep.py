"""Preparation throughput with 1 and 2 Ray workers on the same synthetic ADE20K set.

    .venv/bin/python benchmarks/prep.py --images 96

Each setting starts its own local Ray (``num_cpus`` = workers), warms its workers up on a
small set (process start and imports take seconds), then writes fresh shards of the timed set;
the time is from task submission to the last shard.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ray

from dups.data.prep import prepare
from dups.data.synth import write_ade20k_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=683)
    ap.add_argument("--shards", type=int, default=8, help="about this many shards")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = write_ade20k_layout(Path(tmp) / "src", args.images, 0, (args.height, args.width))
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        warm = write_ade20k_layout(Path(tmp) / "warm", 4, 0, (64, 64))
        rates = {}
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            prepare("ade20k", str(warm), str(Path(tmp) / f"warm{workers}"), splits=("train",),
                    shard_bytes=1, progress=False)  # one tiny shard per image: every worker starts
            m = prepare("ade20k", str(src), str(Path(tmp) / f"out{workers}"), splits=("train",),
                        shard_bytes=total // args.shards + 1, progress=False)
            ray.shutdown()
            rates[workers] = m["splits"]["train"]["samples"] / m["run"]["seconds"]
            print(f"{workers} worker(s): {m['splits']['train']['samples']} images in "
                  f"{m['run']['seconds']:.1f} s = {rates[workers]:.1f} images/s "
                  f"({len(m['splits']['train']['shards'])} shards)")
    print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x "
          f"({args.height}x{args.width} synthetic scenes, this machine)")


if __name__ == "__main__":
    main()
