"""Shared pieces of the training tests: a small prepared dataset and test configs."""
from __future__ import annotations

import os
from pathlib import Path

from dups.data.prep import prepare
from dups.data.synth import write_ade20k_layout
from dups.config import load_config


def make_dataset(root: Path, train: int = 16, val: int = 2, seed: int = 11, shard_bytes: int = 40_000) -> str:
    write_ade20k_layout(root / "src", train=train, val=val, size=(96, 128), seed=seed)
    prepare("ade20k", str(root / "src"), str(root / "shards"), shard_bytes=shard_bytes,
            progress=False, use_ray=False)
    return str(root / "shards")


def test_config(shards: str, out: Path, *extra: str):
    return load_config("demo", [
        f"data.train={shards}", f"train.output={out}", f"tracking.uri=sqlite:///{out}/mlruns.db",
        "data.crop=64", "data.batch_size=2", "data.workers=1", "data.shuffle_buffer=8",
        "train.log_every=1", "train.pictures=1", "model.num_classes=150", *extra])


def spawned_rank(rank: int, world: int, port: int, overrides: list[str], shards: str, out: str, queue):
    """Entry point of one rank in a spawned process group (no Ray)."""
    import torch.distributed as dist

    from dups.cluster.launch import local_hooks
    from dups.engine.trainer import train

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = test_config(shards, Path(out), *overrides)
    result = train(cfg, local_hooks(cfg))
    queue.put((rank, result.steps, result.losses, result.eval))
    dist.barrier()
    dist.destroy_process_group()
