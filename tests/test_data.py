"""Streaming loader: exact resume, equal batches on every rank, no duplicates, S3, score maps."""
import time

import numpy as np
import pytest
import torch

from data_prep.job import prepare
from data_prep.synth import write_ade20k_layout
from model.edges import edge_scores
from pipeline import augment
from pipeline.data import TrainStream, load_manifest, read_shard, shards_of, train_loader
from pipeline.train import _SegmentationTransform

TRANSFORM = _SegmentationTransform(64, (0.5, 1.5), True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_ade20k_layout(root / "src", train=14, val=3, size=(96, 128), seed=5)
    prepare("ade20k", str(root / "src"), str(root / "shards"), shard_bytes=25_000,
            progress=False, use_ray=False)
    return str(root / "shards")


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_resume_gives_the_same_batches(dataset):
    shards = shards_of(dataset, load_manifest(dataset), "train")
    args = dict(transform=TRANSFORM, batch_size=2, rank=0, world=1, workers=2, seed=3, shuffle_buffer=8)
    loader, position = train_loader(shards, **args)
    per_epoch = position.stream.batches_per_epoch(0)
    n = per_epoch + 5  # crosses an epoch boundary
    reference = take(loader, n)
    for stop in (3, per_epoch - 1, per_epoch + 2):
        loader, position = train_loader(shards, **args)
        for _ in take(loader, stop):
            position.advance()
        resumed, _ = train_loader(shards, **args, position=position.state_dict())
        for want, got in zip(reference[stop:], take(resumed, n - stop)):
            assert got["keys"] == want["keys"]
            assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])
            for s in (32, 16, 8):
                assert torch.equal(got["scores"][s], want["scores"][s])


@pytest.mark.parametrize("world,workers", [(2, 2), (4, 2)])  # shard split / sample split
def test_every_rank_takes_the_same_number_of_batches(dataset, world, workers):
    shards = shards_of(dataset, load_manifest(dataset), "train")
    sizes = [s.samples for s in shards]
    assert len(set(sizes)) > 1, "the shards should be uneven for this test"
    start = time.monotonic()
    for epoch in range(3):
        streams = [TrainStream(shards, TRANSFORM, 1, r, world, workers, seed=1, shuffle_buffer=4,
                               start=(epoch, 0)) for r in range(world)]
        counts = {s.batches_per_epoch(epoch) for s in streams}
        assert len(counts) == 1 and counts.pop() > 0
        keys = []
        for s in streams:  # each rank: its workers' streams, one epoch each
            for w in range(workers):
                stream = s.rank * workers + w
                m = s.plan(epoch).batches
                samples = [smp["__key__"] for _, smp in s._stream_samples(epoch, stream)][:m]
                assert len(samples) == m
                keys += samples
        assert len(keys) == len(set(keys)), "a sample was served twice in one epoch"
    assert time.monotonic() - start < 60


def test_precomputed_maps_equal_recomputed_ones(dataset):
    manifest = load_manifest(dataset)
    sides = set()
    for shard in shards_of(dataset, manifest, "val"):
        for sample in read_shard(shard.url):
            ev = augment.eval_segmentation(sample, 0)  # unchanged: the shard's own maps
            sides.update(ev["label"].shape)
            recomputed = edge_scores(ev["label"])
            for s in (32, 16, 8):
                torch.testing.assert_close(ev["scores"][s], recomputed[s], atol=5e-4, rtol=0)
    # the synthetic scenes have sides of any length, as ADE20K's, so partial cells are covered
    assert any(side % 8 for side in sides), sides
    # and a training sample's maps describe its augmented label
    sample = next(read_shard(shards_of(dataset, manifest, "train")[0].url))
    out = TRANSFORM(sample, np.random.default_rng(0))
    for s, m in edge_scores(out["label"]).items():
        assert torch.equal(out["scores"][s], m)


def test_streams_from_s3_like_from_disk(dataset, tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "x",
                     "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="shards")
        src = tmp_path / "src"
        write_ade20k_layout(src, train=6, val=1, size=(96, 128), seed=5)
        prepare("ade20k", str(src), "s3://shards/ade", shard_bytes=25_000, progress=False, use_ray=False)
        prepare("ade20k", str(src), str(tmp_path / "local"), shard_bytes=25_000, progress=False, use_ray=False)
        args = dict(transform=TRANSFORM, batch_size=2, rank=0, world=1, workers=0, seed=0, shuffle_buffer=4)
        remote = take(train_loader(shards_of("s3://shards/ade", load_manifest("s3://shards/ade"), "train"), **args)[0], 3)
        local = take(train_loader(shards_of(str(tmp_path / "local"), load_manifest(str(tmp_path / "local")), "train"), **args)[0], 3)
        for a, b in zip(remote, local):
            assert a["keys"] == b["keys"] and torch.equal(a["image"], b["image"])
    finally:
        server.stop()
