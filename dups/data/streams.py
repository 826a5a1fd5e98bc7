"""Streaming WebDataset shards (local or S3) into training batches, resumably.

Each rank runs ``workers`` DataLoader processes; every (rank, worker) pair is one *stream*.
Epoch e: the shards are permuted with (seed, e), read as one circular sequence and cut into
equal contiguous runs from a seeded point, one per stream (``plan_epoch``), so every sample is
seen once per epoch whatever the numbers of shards and streams; a stream seeks to its run
through the shard's index of byte offsets (``read_samples``). From the manifest's per-shard counts every rank
computes the same number of batches per stream, m_e, so all ranks take exactly the same
number of steps and none can hang on a collective; the few samples beyond m_e batches in a
stream (fewer than a batch) wait for the next epoch's permutation.

Shards are read, and samples shuffled, by webdataset's own pipeline stages; what is written
here is what exact resume and equal batch counts need (each says why). Samples pass
webdataset's shuffle buffer (seeded per stream and epoch) as raw bytes; decoding and
augmentation come after, in ``augment`` (a label PNG must keep its palette indices, which
webdataset's image decoders convert), with a generator seeded by (seed, epoch, stream, index). The
position is (epoch, batches taken in the epoch); DataLoader serves workers round-robin, so
on resume each worker skips its own earlier batches without decoding them and the workers'
roles are rotated so that the first batch comes from the right one. The batches after a
resume are bitwise those of an uninterrupted run.
"""
from __future__ import annotations

import itertools
import json
import random
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from dups.data.storage import S3Storage, open_storage

MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard that cannot be read as its manifest says: reading it again fails again."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    offsets: tuple[int, ...] = ()  # byte offsets of samples 0, every, 2 * every ... (prep's index)
    every: int = 0


def load_manifest(root: str) -> dict:
    storage = open_storage(root)
    if not storage.exists(MANIFEST):
        raise FileNotFoundError(f"no {MANIFEST} under {root} (run `dups prep` first)")
    return json.loads(storage.get_bytes(MANIFEST))


def shards_of(root: str, manifest: dict, split: str) -> list[Shard]:
    if split not in manifest["splits"]:
        raise ValueError(f"{root}/{MANIFEST} has no split {split!r} (has {sorted(manifest['splits'])})")
    storage = open_storage(root)
    return [Shard(storage.shard_url(s["name"]), s["samples"], tuple(s.get("index", {}).get("offsets", ())),
                  s.get("index", {}).get("every", 0))
            for s in manifest["splits"][split]["shards"] if s["samples"] > 0]


def _open(url: str, start: int = 0):
    """The shard's bytes from ``start`` on: a local file, or a boto3 stream that asks again
    from where it was after a transport error (endpoint, region and keys from the environment,
    as everywhere in the project; webdataset's own S3 opener runs the AWS CLI)."""
    if url.startswith("s3://"):
        return S3Storage(url).open_read(start=start)
    f = open(url, "rb")
    f.seek(start)
    return f


def read_shard(url: str, start: int = 0) -> Iterator[dict]:
    """Raw samples of one shard through webdataset's tar stages: {"__key__", member suffix:
    bytes}, the image as ``img``; from byte ``start`` (a sample's first header, from the
    shard's index) on. A damaged tar is an error naming the shard and the last good sample
    (webdataset's own message names neither); an I/O error that outlasts the S3 reader's
    retries stays an ``OSError``, which a restart may get past."""
    stream = _open(url, start)
    samples = wds.DataPipeline(lambda: iter([{"url": url, "stream": stream}]), tar_file_expander,
                               group_by_keys, wds.rename(img="img.jpg;img.png"))
    last = None
    try:
        for sample in samples:
            last = sample["__key__"]
            yield sample
    except (tarfile.TarError, EOFError, ValueError) as err:  # (an OSError is I/O, not the format)
        raise ShardError(f"shard {url} is damaged after sample {last!r} "
                         f"({type(err).__name__}: {str(err.args[0] if err.args else err).split(' @ ')[0]}): run `dups prep` again") from err
    finally:
        stream.close()


def read_samples(shard: Shard, first: int, stop: int) -> Iterator[dict]:
    """Samples ``first`` to ``stop`` of a shard: read from the indexed sample at or before
    ``first`` (from the start for a shard without an index), the ones before ``first``
    passed over, not decoded. A shard shorter than its manifest says is an error naming it:
    every rank must take the same number of batches."""
    mark = min(first // shard.every, len(shard.offsets) - 1) if shard.every and shard.offsets else -1
    n = mark * shard.every - 1 if mark >= 0 else -1
    samples = read_shard(shard.url, shard.offsets[mark] if mark >= 0 else 0)
    try:
        for n, sample in enumerate(samples, start=n + 1):
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
    """The shards in a seeded order make one circular sequence of N samples, cut into
    ``streams`` contiguous runs of N // streams (or one more) from a seeded starting point;
    every stream reads the first m * batch_size samples of its run,
    m = (N // streams) // batch_size. So an epoch reads every sample once, bar fewer than
    batch_size + 1 per stream, whatever the shard count; and as the order and the starting
    point change every epoch, so do the samples left over (with one shard, only the start
    point moves: without it, the same samples would be left over every epoch)."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(shards)))
    rng.shuffle(order)
    total = sum(s.samples for s in shards)
    start = rng.randrange(total) if total else 0
    batches = (total // streams) // batch_size
    pieces = []
    for stream in range(streams):
        lo = start + stream * total // streams
        hi, pos, mine = lo + batches * batch_size, 0, []
        for i in order + order:  # twice round: a run may wrap past the end
            first, stop = max(lo, pos), min(hi, pos + shards[i].samples)
            if first < stop:
                mine.append((i, first - pos, stop - pos))
            pos += shards[i].samples
        pieces.append(tuple(mine))
    return StreamPlan(tuple(pieces), batches)


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
        # the stream's own run of samples (plan_epoch), not webdataset's split_by_node /
        # split_by_worker: those split by shard, so ranks would take different numbers of batches
        raw = (sample for i, first, stop in plan.pieces[stream] for sample in read_samples(self.shards[i], first, stop))
        yield from enumerate(wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(raw))

    def __iter__(self) -> Iterator[dict]:
        """Batches by hand, not ``wds.batched``: on resume a worker passes over its earlier
        batches without decoding them, which needs the count of samples per batch here."""
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
        samples = itertools.chain.from_iterable(read_shard(shard.url) for shard in self.shards)
        return iter(wds.DataPipeline(lambda: samples, wds.slice(0, self.limit or None),
                                     wds.slice(self.rank, None, self.world), wds.map(self.transform)))
