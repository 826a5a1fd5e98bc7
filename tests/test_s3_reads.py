"""Reading shards from S3 through a connection that stalls or drops mid-shard: the reader asks
again from the byte it had reached; only a connection that never recovers is an error, and an
``OSError`` (a restart may get past it), not a damaged shard."""
import logging
from pathlib import Path

import boto3
import pytest

import train_helpers as th
from s3_proxy import StallingProxy
from dups.data.storage import ResumableRead, S3Storage
from dups.data.streams import ShardError, read_shard


@pytest.fixture
def shard_on_s3(s3_server, tmp_path, monkeypatch):
    shards = Path(th.make_dataset(tmp_path / "data"))
    shard = sorted(shards.glob("ade20k-train-*.tar"))[0]
    boto3.client("s3").create_bucket(Bucket="data")
    boto3.client("s3").upload_file(str(shard), "data", shard.name)
    monkeypatch.setattr(S3Storage, "read_timeout", 1.0)
    monkeypatch.setattr(ResumableRead, "backoff", 0.05)
    return shard, s3_server


def samples_of(url: str) -> list[tuple[str, bytes, bytes]]:
    return [(s["__key__"], s["img"], s["seg.png"]) for s in read_shard(url)]


def test_a_stall_mid_shard_is_read_past_from_where_it_stopped(shard_on_s3, monkeypatch, caplog):
    shard, server = shard_on_s3
    assert shard.stat().st_size > 60_000
    proxy = StallingProxy(server, after=30_000, stalls=2)  # the first read and its first resumption
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        with caplog.at_level(logging.WARNING, logger="dups.storage"):
            got = samples_of(f"s3://data/{shard.name}")
    finally:
        proxy.close()
    assert proxy.stalled == 2
    assert got == samples_of(str(shard)) and len(got) > 3  # every sample, each whole, in order
    retries = [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]
    assert len(retries) == 2 and all("ReadTimeoutError" in m for m in retries), retries


def test_a_connection_that_never_recovers_is_an_io_error_not_a_damaged_shard(shard_on_s3, monkeypatch):
    shard, server = shard_on_s3
    proxy = StallingProxy(server, after=30_000, stalls=100, then=100)  # then not a byte more
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # (botocore's own retries of a request: not ours to count)
    monkeypatch.setattr(ResumableRead, "retries", 2)
    try:
        with pytest.raises(OSError, match=rf"s3://data/{shard.name}: 3 transport errors in a row") as err:
            samples_of(f"s3://data/{shard.name}")
    finally:
        proxy.close()
    assert not isinstance(err.value, ShardError)
    assert proxy.stalled == 3
