"""Streaming loader: exact resume, equal batches on every rank, no duplicates, S3, score maps."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dups.data.prep import prepare
from dups.data.synth import write_ade20k_layout
from dups.models.edges import edge_scores
from dups.data import augment
from dups.data.streams import TrainStream, load_manifest, plan_epoch, read_samples, read_shard, shards_of, train_loader
from dups.config import load_config
from dups.tasks.segmentation import SegmentationEval, SegmentationTransform

TRANSFORM = SegmentationTransform(64, (0.5, 1.5), True)


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
    # with upsampling.edge_radius the run's transforms compute the widened targets instead
    cfg = load_config("demo", ["upsampling.edge_radius=2"])
    out = SegmentationTransform.of(cfg)(sample, np.random.default_rng(0))
    ev = SegmentationEval.of(cfg)(sample)
    for got, label in ((out, out["label"]), (ev, ev["label"])):
        for s, m in edge_scores(label, radius=2).items():
            assert torch.equal(got["scores"][s], m)
            assert m.sum() > edge_scores(label)[s].sum()


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


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory):
    import train_helpers as th

    return th.make_dataset(tmp_path_factory.mktemp("five"), train=23, val=1, seed=7, shard_bytes=27_000)


def test_an_epoch_reads_every_sample_once(five_shards):
    """2 ranks x 2 DataLoader workers over 5 uneven shards: one epoch's batches hold every
    training sample once, bar fewer than a batch + 1 per stream."""
    manifest = load_manifest(five_shards)
    shards = shards_of(five_shards, manifest, "train")
    assert len(shards) == 5 and len({s.samples for s in shards}) > 1
    split = {sample["__key__"] for s in shards for sample in read_shard(s.url)}
    assert len(split) == sum(s.samples for s in shards) == 23
    batch, streams = 1, 4
    for epoch in (0, 1):
        keys = []
        for rank in range(2):
            loader, position = train_loader(shards, TRANSFORM, batch, rank, 2, 2, seed=4, shuffle_buffer=4,
                                            position={"epoch": epoch, "taken": 0})
            n = position.stream.batches_per_epoch(epoch)
            keys += [k for b in take(loader, n) for k in b["keys"]]
        assert len(keys) == len(set(keys)), "a sample was served twice in one epoch"
        assert set(keys) <= split and len(split) - len(keys) < streams * (batch + 1)
        assert len(keys) == 20  # 23 // 4 streams = 5 each (dealing whole shards gave 16)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """23 training samples in one shard, indexed every 4th sample."""
    import dups.data.prep as job

    root = tmp_path_factory.mktemp("one")
    write_ade20k_layout(root / "src", train=23, val=1, size=(96, 128), seed=9)
    every, job.INDEX_EVERY = job.INDEX_EVERY, 4
    try:
        prepare("ade20k", str(root / "src"), str(root / "shards"), shard_bytes=10**9, progress=False,
                use_ray=False)
    finally:
        job.INDEX_EVERY = every
    return str(root / "shards")


def test_with_one_shard_every_sample_is_trained_on_and_no_epoch_repeats_one(one_shard):
    """ADE20K's training split is one shard at the default size: with the cut points fixed,
    the same samples were left over every epoch, for the whole run."""
    shards = shards_of(one_shard, load_manifest(one_shard), "train")
    assert len(shards) == 1 and shards[0].samples == 23 and shards[0].every == 4
    assert len(shards[0].offsets) == 6
    seen = set()
    for epoch in range(8):  # 4 streams x 2 batches of 2 = 16 of 23 per epoch
        plan = plan_epoch(shards, epoch, seed=4, streams=4, batch_size=2)
        mine = [n for pieces in plan.pieces for _, first, stop in pieces for n in range(first, stop)]
        assert len(mine) == len(set(mine)) == 16
        seen |= set(mine)
    assert seen == set(range(23))
    split = [s["__key__"] for s in read_shard(shards[0].url)]
    for epoch in (0, 1):  # through the loaders, with runs that wrap past the shard's end
        keys = []
        for rank in range(2):
            loader, position = train_loader(shards, TRANSFORM, 2, rank, 2, 2, seed=4, shuffle_buffer=4,
                                            position={"epoch": epoch, "taken": 0})
            keys += [k for b in take(loader, position.stream.batches_per_epoch(epoch)) for k in b["keys"]]
        plan = plan_epoch(shards, epoch, seed=4, streams=4, batch_size=2)
        assert sorted(keys) == sorted(split[n] for pieces in plan.pieces for _, a, b in pieces for n in range(a, b))


def test_a_stream_seeks_to_its_samples_through_the_shard_index(one_shard, tmp_path, s3_server, monkeypatch):
    import boto3

    from s3_proxy import StallingProxy

    shard = shards_of(one_shard, load_manifest(one_shard), "train")[0]
    everything = list(read_shard(shard.url))
    for first, stop in ((0, 3), (5, 9), (8, 9), (17, 23), (22, 23)):
        assert list(read_samples(shard, first, stop)) == everything[first:stop]
    boto3.client("s3").create_bucket(Bucket="shards")
    boto3.client("s3").upload_file(shard.url, "shards", "one.tar")
    remote = type(shard)("s3://shards/one.tar", shard.samples, shard.offsets, shard.every)
    proxy = StallingProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        got = [{k: v for k, v in sample.items() if k != "__url__"} for sample in read_samples(remote, 20, 23)]
        assert got == [{k: v for k, v in sample.items() if k != "__url__"} for sample in everything[20:23]]
    finally:
        proxy.close()
    size = Path(shard.url).stat().st_size
    assert proxy.answered < size * 0.3, (proxy.answered, size)  # from sample 20's header, not byte 0


def test_prep_mixes_a_class_sorted_listing(tmp_path):
    """ImageNet's listing is sorted by class; the training shards are not, so a batch read
    straight through (no shuffle buffer) holds several classes."""
    import prep_fixtures as fx
    from dups.tasks.classification import ClassificationTransform

    for c in range(6):
        for j in range(6):
            fx.jpeg(tmp_path / "in" / "train" / f"n0000000{c}" / f"n0000000{c}_{j}.JPEG", 24, 24, seed=c * 6 + j)
    prepare("imagenet", str(tmp_path / "in"), str(tmp_path / "shards"), splits=("train",),
            shard_bytes=4_000, progress=False, use_ray=False)
    shards = shards_of(str(tmp_path / "shards"), load_manifest(str(tmp_path / "shards")), "train")
    assert len(shards) > 3
    loader, position = train_loader(shards, ClassificationTransform(16), 4, 0, 1, 0, seed=0, shuffle_buffer=1)
    batches = take(loader, position.stream.batches_per_epoch(0))
    classes = [len(set(b["label"].tolist())) for b in batches]
    assert np.mean(classes) >= 2.5, classes


def test_a_damaged_shard_is_an_error_naming_it_and_the_last_sample(dataset, tmp_path):
    from dups.data.streams import Shard, read_samples

    shard = shards_of(dataset, load_manifest(dataset), "train")[0]
    data = open(shard.url, "rb").read()
    keys = [s["__key__"] for s in read_shard(shard.url)]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])  # a truncated copy: ends inside a member
    with pytest.raises(ValueError, match=r"shard .*cut\.tar is damaged after sample 'SYN_train_\d+'"):
        list(read_samples(Shard(str(cut), shard.samples), 0, shard.samples))
    short = tmp_path / "short.tar"  # a shard with fewer samples than its manifest says
    short.write_bytes(data)
    with pytest.raises(ValueError, match=rf"short\.tar ended after {len(keys)} samples; its manifest says 99"):
        list(read_samples(Shard(str(short), 99), 0, 99))
