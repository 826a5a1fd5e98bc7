"""Fault tolerance: a training worker killed mid-run, a preparation job killed mid-way."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

import prep_fixtures as fx
import train_helpers as th
from dups.cluster.launch import ray_storage, train_ray
from dups.data.prep import prepare

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`

ROOT = Path(__file__).resolve().parents[1]


def kill_a_worker_after_first_checkpoint(storage: Path, finished_marker: str, record: dict, timeout=300):
    """Waits for the run's first complete checkpoint, then SIGKILLs one Ray Train worker
    process: at once, before Ray's controller has (on its next poll) registered it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(storage.glob("*/step*/complete.json")):  # (<launch>/step<N>)
            break
        time.sleep(0.05)
    record["checkpoints_before"] = sorted(p.name for p in storage.glob("*/step*"))
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            record["killed"] = proc.info["pid"]
            record["final_existed"] = bool(list(storage.glob(f"*/{finished_marker}")))
            os.kill(proc.info["pid"], signal.SIGKILL)
            return


def test_killed_training_worker_restarts_from_the_last_checkpoint(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    shards = th.make_dataset(tmp_path / "data")
    iters = 20
    cfg = th.test_config(shards, tmp_path, f"train.iters={iters}", "train.checkpoint_every=4",
                         "train.eval_every=100", "launch.workers=2", "launch.max_failures=2")
    storage = Path(ray_storage(cfg)) / cfg.name
    record: dict = {}
    watcher = threading.Thread(target=kill_a_worker_after_first_checkpoint,
                               args=(storage, f"step{iters:08d}", record), daemon=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        watcher.start()
        result = train_ray(cfg)
    finally:
        ray.shutdown()
    watcher.join(timeout=10)
    assert record.get("killed"), "no worker was killed"
    assert not record["final_existed"], "the kill came after the run had finished"
    assert result.error is None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    assert len(runs) == 1, "a restarted run must log to the same MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, iters + 1)), "every step logged exactly once"
    assert runs[0].data.tags["last_checkpoint"].endswith(f"step{iters:08d}")
    # the restart went on from a checkpoint, not from step 0 (MLflow would hide replayed steps)
    resumed = int(runs[0].data.tags["resumed_from"].rsplit(" ", 1)[1])
    assert 4 <= resumed < iters and resumed % 4 == 0, runs[0].data.tags["resumed_from"]


def test_killed_prep_job_reruns_to_identical_shards(tmp_path):
    src = tmp_path / "src"
    fx.ade20k_with_bad_inputs(src, train=60, val=2)  # enough shards that the kill lands mid-job
    reference = prepare("ade20k", str(src), str(tmp_path / "ref"), shard_bytes=20_000,
                        progress=False, use_ray=False)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "dups.cli", "prep", "ade20k", "--src", str(src),
                             "--out", str(out), "--shard-size", "0.02", "--num-cpus", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.tar.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and the local Ray it started
    proc.wait(timeout=30)
    written = len(list(out.glob("*.tar.json")))
    total = sum(len(s["shards"]) for s in reference["splits"].values())
    assert 2 <= written < total, (written, total)
    assert not (out / "manifest.json").exists()
    again = prepare("ade20k", str(src), str(out), shard_bytes=20_000, progress=False, use_ray=False)
    assert again["run"]["shards_skipped"] >= 2
    assert again["splits"] == reference["splits"]
    for split in again["splits"].values():
        for shard in split["shards"]:
            assert (out / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()


def test_a_damaged_shard_stops_the_run_instead_of_restarting_into_it(tmp_path, monkeypatch):
    import ray
    from ray.train import TrainingFailedError

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    shards = Path(th.make_dataset(tmp_path / "data"))
    for victim in sorted(shards.glob("ade20k-train-*.tar")):  # the manifest still counts them whole
        victim.write_bytes(victim.read_bytes()[:3000])
    cfg = th.test_config(str(shards), tmp_path, "train.iters=6", "train.checkpoint_every=3",
                         "launch.workers=2", "launch.max_failures=2")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start = time.monotonic()
        with pytest.raises(TrainingFailedError) as failure:
            result = train_ray(cfg)
            if result.error is not None:
                raise result.error
        assert time.monotonic() - start < 240
    finally:
        ray.shutdown()
    errors = [str(e) for e in failure.value.worker_failures.values()]
    assert errors and all("not restarted: dups.data.streams.ShardError: shard " in e and "is damaged" in e
                          for e in errors), errors
    assert len(list((Path(ray_storage(cfg)) / cfg.name).glob("*/fatal.json"))) == 1  # in its launch's folder
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_weights_that_do_not_fit_fail_the_launch_once_not_every_restart(tmp_path, monkeypatch):
    """A ValueError inside the workers (train.pretrained that exists but does not fit) would
    meet every restart again: the launch fails at once, each restart saying why it stopped."""
    import ray
    import torch
    from ray.train import TrainingFailedError
    from safetensors.torch import save_file

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    shards = th.make_dataset(tmp_path / "data", train=8, val=1)
    save_file({"encoder.not_a_layer": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    cfg = th.test_config(shards, tmp_path, "train.iters=4", "launch.workers=2", "launch.max_failures=3",
                         f"train.pretrained={tmp_path / 'foreign.safetensors'}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(TrainingFailedError) as failure:
            result = train_ray(cfg)
            if result.error is not None:
                raise result.error
    finally:
        ray.shutdown()
    errors = [str(e) for e in failure.value.worker_failures.values()]
    assert errors and all("not restarted: ValueError: train.pretrained" in e and "does not fit" in e
                          for e in errors), errors
    fatal = list((Path(ray_storage(cfg)) / cfg.name).glob("*/fatal.json"))
    assert len(fatal) == 1 and "missing" in fatal[0].read_text()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
