"""The preparation job on a real local Ray and a real S3-protocol server (moto) on 127.0.0.1."""
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import prep_fixtures as fx
from dups.data.prep import prepare
from dups.data.labels import remap_table
from dups.data.readers import list_split
from dups.data.samples import encode_classification, encode_segmentation
from dups.models.edges import edge_scores

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_readers_on_each_published_layout(tmp_path):
    from dups.data.labels import valid_raw_values

    fx.cocostuff(tmp_path / "coco")
    (ref,) = list_split("cocostuff", tmp_path / "coco", "train").samples
    members, _ = encode_segmentation(ref, remap_table("cocostuff")[0], valid_raw_values("cocostuff"))
    seg = fx.decode_png(members["seg.png"])
    assert seg[0, 0] == 0 and seg[30, 0] == 80 and seg[30, 40] == 170 and (seg == 255).sum() == 0

    fx.cityscapes(tmp_path / "cs")
    (ref,) = list_split("cityscapes", tmp_path / "cs", "val").samples
    assert ref.key == "aachen_000000_000019"
    members, _ = encode_segmentation(ref, remap_table("cityscapes")[0], valid_raw_values("cityscapes"))
    seg = fx.decode_png(members["seg.png"])
    assert seg[0, 0] == 255 and seg[40, 0] == 0 and seg[0, 100] == 13 and "img.png" in members
    assert len(remap_table("cityscapes")[1]) == 19

    fx.imagenet(tmp_path / "in")
    train = list_split("imagenet", tmp_path / "in", "train")
    assert [s.cls for s in train.samples] == [0, 0, 1, 1]
    assert train.classes == ("n01440764 tench, Tinca tinca", "n01443537 goldfish")
    val = list_split("imagenet", tmp_path / "in", "val")
    assert [(s.key, s.cls) for s in val.samples] == [("ILSVRC2012_val_00000001", 1), ("ILSVRC2012_val_00000002", 0)]
    assert val.rejected[0].reason.startswith("missing pair")
    members, _ = encode_classification(val.samples[0])
    assert members["cls"] == b"1" and json.loads(members["json"])["synset"] == "n01443537"

    fx.ade20k_with_bad_inputs(tmp_path / "ade", train=2, val=1)
    listing = list_split("ade20k", tmp_path / "ade", "train")
    assert {r.reason for r in listing.rejected} == {"missing pair: no label for this image",
                                                    "missing pair: no image for this label"}


def test_missing_or_empty_sources_are_immediate_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="source directory does not exist: /no/such/dir"):
        prepare("ade20k", "/no/such/dir", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="ADE20K image folder not found"):
        prepare("ade20k", str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no ade20k train samples found"):
        prepare("ade20k", str(tmp_path), str(tmp_path / "out"), splits=("train",))


def read_back_with_webdataset(urls):
    import webdataset as wds

    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_end_to_end_local_bad_inputs_readback_and_rerun(tmp_path, local_ray):
    src, out = tmp_path / "ade", tmp_path / "out"
    bad = fx.ade20k_with_bad_inputs(src)
    manifest = prepare("ade20k", str(src), str(out), shard_bytes=25_000, progress=False)

    # every bad input is reported with its reason and quarantined; the job finished
    reasons = {Path(r["file"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == set(bad)
    for name, why in bad.items():
        assert reasons[name].startswith(why), (name, reasons[name])
    quarantined = {r["quarantined"] for r in manifest["rejected"] if "quarantined" in r}
    assert quarantined and all((out / q).is_file() for q in quarantined)
    assert manifest["splits"]["train"]["samples"] == 6 and manifest["splits"]["val"]["samples"] == 2
    assert manifest["num_classes"] == 150 and manifest["classes"][0] == "wall"
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 6
    assert set(manifest["statistics"]["upsampling_fraction"]) == {"32", "16", "8"}

    # plain webdataset and tar read back exactly what was written
    samples = read_back_with_webdataset([str(out / s["name"]) for s in shards])
    keys = [s["__key__"] for s in samples]  # in prep's seeded order, each once
    assert sorted(keys) == [f"SYN_train_{i:08d}" for i in range(1, 7)] and keys != sorted(keys)
    table = remap_table("ade20k")[0]
    for s in samples:
        stem = s["__key__"]
        assert s["img.jpg"] == (src / "images" / "training" / f"{stem}.jpg").read_bytes()
        raw = fx.decode_png((src / "annotations" / "training" / f"{stem}.png").read_bytes())
        seg = fx.decode_png(s["seg.png"])
        np.testing.assert_array_equal(seg, table[raw])
        for scale, want in edge_scores(seg).items():
            got = np.load(io.BytesIO(s[f"edge{scale}.npy"]))
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, want.numpy().astype(np.float16))
        meta = json.loads(s["json"])
        assert (meta["height"], meta["width"]) == seg.shape
    listing = subprocess.run(["tar", "-tf", str(out / shards[0]["name"])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert f"{keys[0]}.seg.png" in listing and f"{keys[0]}.edge8.npy" in listing
    with tarfile.open(out / shards[0]["name"]) as tf:
        assert {m.mtime for m in tf.getmembers()} == {0}

    # a re-run skips the complete shards and gives identical bytes; a damaged shard is redone
    again = prepare("ade20k", str(src), str(out), shard_bytes=25_000, progress=False)
    assert again["run"]["shards_written"] == 0
    assert again["splits"] == manifest["splits"]
    damaged = out / shards[0]["name"]
    damaged.write_bytes(damaged.read_bytes()[:-100] + b"x" * 100)
    third = prepare("ade20k", str(src), str(out), shard_bytes=25_000, progress=False)
    assert third["run"]["shards_written"] == 1 and third["splits"] == manifest["splits"]


def test_s3_output_is_byte_identical_to_local(tmp_path, local_ray, s3_server):
    import boto3

    src = tmp_path / "ade"
    fx.ade20k_with_bad_inputs(src, train=4, val=1)
    local = prepare("ade20k", str(src), str(tmp_path / "local"), shard_bytes=25_000, progress=False)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="data")
    # (the module's Ray started before this test's keys were set: they travel only when asked)
    remote = prepare("ade20k", str(src), "s3://data/ade20k", shard_bytes=25_000, progress=False,
                     forward_credentials=True)
    assert remote["splits"] == local["splits"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="ade20k/")["Contents"]}
    assert "ade20k/manifest.json" in keys
    for shard in remote["splits"]["train"]["shards"]:
        body = s3.get_object(Bucket="data", Key=f"ade20k/{shard['name']}")["Body"].read()
        assert body == (tmp_path / "local" / shard["name"]).read_bytes()
    assert any(k.startswith("ade20k/quarantine/train/") for k in keys)
    with pytest.raises(ConnectionError, match="cannot reach bucket 'missing-bucket'"):
        prepare("ade20k", str(src), "s3://missing-bucket/x", progress=False)
