"""Preparation that loses nothing to a hiccup: an I/O error fails its shard's task (retried,
nothing published) instead of rejecting the sample for good; secrets stay out of Ray's task
specs; a re-run checks finished S3 shards without downloading them; a killed writer's
temporary folder goes."""
import io
import os
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
from PIL import Image

import prep_fixtures as fx
from dups.data.prep import TEMP_PREFIX, ShardsFailed, prepare, remove_leftovers
from s3_proxy import StallingProxy

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


def test_an_io_error_fails_its_shard_on_ray_and_a_rerun_loses_no_sample(tmp_path, monkeypatch):
    import ray
    from ray.util.state import list_tasks

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SENTINEL-prep-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    src, out = tmp_path / "src", tmp_path / "out"
    fx.ade20k_with_bad_inputs(src, train=6, val=2)
    victim = src / "images" / "training" / "IOERR.jpg"
    victim.mkdir()  # listed as an image; reading it is an OSError (IsADirectoryError), as EIO is
    fx.png(src / "annotations" / "training" / "IOERR.png", np.ones((96, 128)))
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                       log_to_driver=False)
    try:
        with pytest.raises(ShardsFailed, match=r"1 shard\(s\) not written.*IsADirectoryError.*IOERR\.jpg"):
            prepare("ade20k", str(src), str(out), shard_bytes=20_000, progress=False)
        deadline = time.monotonic() + 60
        while True:  # the state API learns of finished tasks a moment later
            tasks = list_tasks(address=f"http://{context.dashboard_url}", detail=True, limit=1000,
                               filters=[("func_or_class_name", "=", "_shard_task")], raise_on_missing_output=False)
            if any(t.state == "FAILED" and t.attempt_number == 3 for t in tasks) or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        ray.shutdown()
    specs = [str(t.runtime_env_info) for t in tasks]
    assert specs and all("SENTINEL-prep-secret" not in s and "eu-west-3" in s for s in specs), specs[:1]
    assert max(t.attempt_number for t in tasks if t.state == "FAILED") == 3  # tried 4 times
    assert not (out / "manifest.json").exists()
    written = {p.name for p in out.glob("*.tar")}
    sidecars = {p.name[:-len(".json")] for p in out.glob("*.tar.json")}
    assert written == sidecars and len(written) >= 2  # the others are published, whole
    assert not any("IOERR" in p.read_text() for p in out.glob("*.tar.json"))

    size = victim.stat().st_size  # the mount is back: the file, of the size it was listed with
    victim.rmdir()
    photo = io.BytesIO()
    Image.new("RGB", (128, 96), (120, 30, 200)).save(photo, format="JPEG", quality=90)
    assert len(photo.getvalue()) < size
    victim.write_bytes(photo.getvalue() + b"\0" * (size - len(photo.getvalue())))  # (bytes after the end are ignored)
    manifest = prepare("ade20k", str(src), str(out), shard_bytes=20_000, progress=False, use_ray=False)
    assert manifest["run"]["shards_written"] == 1 and manifest["run"]["shards_skipped"] == len(written)
    assert all("IOERR" not in r["file"] for r in manifest["rejected"])
    reference = prepare("ade20k", str(src), str(tmp_path / "ref"), shard_bytes=20_000, progress=False,
                        use_ray=False)
    assert manifest["splits"] == reference["splits"]


def test_a_rerun_verifies_finished_s3_shards_without_downloading_them(tmp_path, s3_server, monkeypatch):
    src = tmp_path / "src"
    fx.ade20k_with_bad_inputs(src, train=12, val=2)
    boto3.client("s3").create_bucket(Bucket="data")
    first = prepare("ade20k", str(src), "s3://data/ade", shard_bytes=20_000, progress=False, use_ray=False)
    total = sum(s["bytes"] for split in first["splits"].values() for s in split["shards"])
    proxy = StallingProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        again = prepare("ade20k", str(src), "s3://data/ade", shard_bytes=20_000, progress=False, use_ray=False)
    finally:
        proxy.close()
    assert again["run"]["shards_skipped"] == sum(len(s["shards"]) for s in first["splits"].values()) > 2
    assert again["splits"] == first["splits"]
    assert proxy.answered < total / 4, (proxy.answered, total)  # HEADs and sidecars, not the shards

    # a shard replaced by something else (same name, no digest stored with it) is written again
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = first["splits"]["train"]["shards"][0]["name"]
    boto3.client("s3").put_object(Bucket="data", Key=f"ade/{name}", Body=b"not the shard")
    third = prepare("ade20k", str(src), "s3://data/ade", shard_bytes=20_000, progress=False, use_ray=False)
    assert third["run"]["shards_written"] == 1 and third["splits"] == first["splits"]


def test_a_killed_writers_temporary_folder_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (gone, alive.pid):
            (tmp_path / f"{TEMP_PREFIX}{pid}-abc").mkdir()
            (tmp_path / f"{TEMP_PREFIX}{pid}-abc" / "ade20k-train-000000.tar").write_bytes(b"x" * 1000)
        src = tmp_path / "src"
        fx.ade20k_with_bad_inputs(src, train=2, val=1)
        prepare("ade20k", str(src), str(tmp_path / "out"), progress=False, use_ray=False)
        assert not (tmp_path / f"{TEMP_PREFIX}{gone}-abc").exists()
        assert (tmp_path / f"{TEMP_PREFIX}{alive.pid}-abc").exists()
        assert remove_leftovers(str(tmp_path)) == []
    finally:
        alive.kill()
        alive.wait(timeout=10)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"{TEMP_PREFIX}{os.getpid()}-")]
