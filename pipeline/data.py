"""Streaming WebDataset shards (local or S3) into training batches, resumably.

Each rank runs ``workers`` DataLoader processes; every (rank, worker) pair is one *stream*.
Epoch e: the shards are permuted with (seed, e), read as one sequence and cut into equal
contiguous runs, one per stream (``plan_epoch``), so every sample is seen once per epoch
whatever the numbers of shards and streams. From the manifest's per-shard counts every rank
computes the same number of batches per stream, m_e, so all ranks take exactly the same
number of steps and none can hang on a collective; the few samples beyond m_e batches in a
stream (fewer than a batch) wait for the next epoch's permutation.

Samples pass a shuffle buffer (seeded per stream and epoch) as raw bytes; decoding and
augmentation come after, with a generator seeded by (seed, epoch, stream, index). The
position is (epoch, batches taken in the epoch); DataLoader serves workers round-robin, so
on resume each worker skips its own earlier batches without decoding them and the workers'
roles are rotated so that the first batch comes from the right one. The batches after a
resume are bitwise those of an uninterrupted run.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.storage import S3Storage, open_storage

MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard that cannot be read as its manifest says: reading it again fails again."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def load_manifest(root: str) -> dict:
    storage = open_storage(root)
    if not storage.exists(MANIFEST):
        raise FileNotFoundError(f"no {MANIFEST} under {root} (run `dups prep` first)")
    return json.loads(storage.get_bytes(MANIFEST))


def shards_of(root: str, manifest: dict, split: str) -> list[Shard]:
    if split not in manifest["splits"]:
        raise ValueError(f"{root}/{MANIFEST} has no split {split!r} (has {sorted(manifest['splits'])})")
    storage = open_storage(root)
    return [Shard(storage.shard_url(s["name"]), s["samples"]) for s in manifest["splits"][split]["shards"]
            if s["samples"] > 0]


def open_stream(url: str):
    """A readable binary stream of a local file or an S3 object (boto3, endpoint from env)."""
    if url.startswith("s3://"):
        obj = S3Storage(url)
        return obj.client.get_object(Bucket=obj.bucket, Key=obj.prefix)["Body"]
    return open(url, "rb")


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one shard: {"__key__", member suffix: bytes}; the image as ``img``.
    A damaged tar is an error naming the shard and the last good sample."""
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = open_stream(url)
    last = None
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            for ext in ("img.jpg", "img.png"):
                if ext in sample:
                    sample["img"] = sample.pop(ext)
            last = sample["__key__"]
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ShardError(f"shard {url} is damaged after sample {last!r} "
                         f"({type(err).__name__}: {err}): run `dups prep` again") from err
    finally:
        stream.close()


def read_samples(shard: Shard, first: int, stop: int) -> Iterator[dict]:
    """Samples ``first`` to ``stop`` of a shard (the ones before are read past, not decoded).
    A shard shorter than its manifest says is an error naming it: every rank must take the
    same number of batches."""
    n = -1
    samples = read_shard(shard.url)
    try:
        for n, sample in enumerate(samples):
            if n >= stop:
                return
            if n >= first:
                yield sample
    finally:
        samples.close()
    if n + 1 < stop:
        raise ShardError(f"shard {shard.url} ended after {n + 1} samples; its manifest says "
                         f"{shard.samples} (truncated or replaced: run `dups prep` again)")


@dataclass(frozen=True)
class StreamPlan:
    """Which samples each stream reads in one epoch."""

    pieces: tuple[tuple[tuple[int, int, int], ...], ...]  # per stream: (shard, first, stop) in order
    batches: int  # m_e: batches every stream yields this epoch


def plan_epoch(shards: list[Shard], epoch: int, seed: int, streams: int, batch_size: int) -> StreamPlan:
    """The shards in a seeded order make one sequence of N samples, cut into ``streams``
    contiguous runs of N // streams (or one more); every stream reads the first
    m * batch_size samples of its run, m = (N // streams) // batch_size. So an epoch reads
    every sample once, bar fewer than batch_size + 1 per stream, whatever the shard count."""
    order = list(range(len(shards)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    total = sum(s.samples for s in shards)
    batches = (total // streams) // batch_size
    pieces = []
    for stream in range(streams):
        lo = stream * total // streams
        hi, pos, mine = lo + batches * batch_size, 0, []
        for i in order:
            first, stop = max(lo, pos), min(hi, pos + shards[i].samples)
            if first < stop:
                mine.append((i, first - pos, stop - pos))
            pos += shards[i].samples
        pieces.append(tuple(mine))
    return StreamPlan(tuple(pieces), batches)


def shuffled(samples: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    pool: list[dict] = []
    for s in samples:
        if len(pool) < buffer:
            pool.append(s)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = s
    rng.shuffle(pool)
    yield from pool


def collate(samples: list[dict]) -> dict:
    out = {"image": torch.stack([s["image"] for s in samples]),
           "label": torch.stack([s["label"] for s in samples]),
           "keys": [s["key"] for s in samples]}
    if "scores" in samples[0]:
        out["scores"] = {k: torch.stack([s["scores"][k] for s in samples]) for k in samples[0]["scores"]}
    return out


class TrainStream(IterableDataset):
    """Infinite, rank- and worker-split, resumable stream of collated training batches."""

    def __init__(self, shards: list[Shard], transform: Callable[[dict, np.random.Generator], dict],
                 batch_size: int, rank: int, world: int, workers: int, seed: int = 0,
                 shuffle_buffer: int = 256, start: tuple[int, int] = (0, 0)):
        if not shards:
            raise ValueError("no training shards with samples")
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world, self.workers = rank, world, max(1, workers)
        self.seed, self.buffer, self.start = seed, shuffle_buffer, start
        if self.plan(0).batches == 0:
            raise ValueError(
                f"{sum(s.samples for s in shards)} samples are too few for {world} rank(s) x "
                f"{self.workers} worker(s) x batch {batch_size}")

    def plan(self, epoch: int) -> StreamPlan:
        return plan_epoch(self.shards, epoch, self.seed, self.world * self.workers, self.batch_size)

    def batches_per_epoch(self, epoch: int) -> int:
        """Batches this rank yields in ``epoch`` (the same on every rank)."""
        return self.plan(epoch).batches * self.workers

    def _stream_samples(self, epoch: int, stream: int) -> Iterator[tuple[int, dict]]:
        plan = self.plan(epoch)
        rng = random.Random(f"{self.seed}-{epoch}-{stream}-buffer")
        def raw():
            for i, first, stop in plan.pieces[stream]:
                yield from read_samples(self.shards[i], first, stop)
        for index, sample in enumerate(shuffled(raw(), self.buffer, rng)):
            yield index, sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"TrainStream built for {self.workers} workers, DataLoader has {info.num_workers}")
        epoch, taken = self.start
        logical = (physical + taken) % self.workers  # rotate roles so the first batch is right
        skip = max(0, -(-(taken - logical) // self.workers))  # own batches before the position
        while True:
            stream = self.rank * self.workers + logical
            m = self.plan(epoch).batches
            batch: list[dict] = []
            done = 0
            for index, sample in self._stream_samples(epoch, stream):
                if done >= m:
                    break
                if done < skip:  # resuming: pass over without decoding
                    if (index + 1) % self.batch_size == 0:
                        done += 1
                    continue
                rng = np.random.default_rng([self.seed, epoch, stream, index])
                batch.append(self.transform(sample, rng))
                if len(batch) == self.batch_size:
                    yield collate(batch)
                    batch, done = [], done + 1
            skip = 0
            epoch += 1


class DataPosition:
    """(epoch, batches taken in it) of a TrainStream, advanced by the training loop."""

    def __init__(self, stream: TrainStream, epoch: int = 0, taken: int = 0):
        self.stream, self.epoch, self.taken = stream, epoch, taken

    def advance(self) -> None:
        self.taken += 1
        if self.taken >= self.stream.batches_per_epoch(self.epoch):
            self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}


def train_loader(shards: list[Shard], transform, batch_size: int, rank: int, world: int,
                 workers: int, seed: int, shuffle_buffer: int, position: dict | None = None):
    """(DataLoader, DataPosition) starting at ``position`` (a DataPosition.state_dict())."""
    start = (position["epoch"], position["taken"]) if position else (0, 0)
    stream = TrainStream(shards, transform, batch_size, rank, world, workers, seed, shuffle_buffer, start)
    # its own generator: creating the iterator must not draw from the global torch RNG, which
    # the model's randomness (and an exact resume) depends on
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                        prefetch_factor=2 if workers else None,
                        generator=torch.Generator().manual_seed(seed))
    return loader, DataPosition(stream, *start)


class EvalStream(IterableDataset):
    """Validation samples, one at a time, sample i on rank i % world, unshuffled."""

    def __init__(self, shards: list[Shard], transform: Callable[[dict], dict], rank: int, world: int,
                 limit: int = 0):
        self.shards, self.transform, self.rank, self.world, self.limit = shards, transform, rank, world, limit

    def __len__(self) -> int:
        """This rank's samples (from the manifest's counts)."""
        total = sum(s.samples for s in self.shards)
        total = min(total, self.limit) if self.limit else total
        return len(range(self.rank, total, self.world))

    def __iter__(self):
        n = 0
        for shard in self.shards:
            for sample in read_shard(shard.url):
                if self.limit and n >= self.limit:
                    return
                if n % self.world == self.rank:
                    yield self.transform(sample)
                n += 1
