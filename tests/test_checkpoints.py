"""Checkpoints on local disk and S3: published whole, found from a run's folder or
``train.output``, resumed, evaluated and exported from S3, pruned; pre-training handed to
fine-tuning through exported safetensors."""
import os
import tempfile
from pathlib import Path

import boto3
import pytest
import torch

import train_helpers as th
from dups.cluster.launch import train_local
from dups.engine.checkpoints import COMPLETE, find_checkpoint, mark_complete, model_state, newest_complete

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return th.make_dataset(tmp_path_factory.mktemp("ckpt-data"))


def s3_names(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_a_crash_between_the_parts_leaves_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    import dups.engine.trainer as train_mod

    common = ["train.iters=4", "train.checkpoint_every=2", "train.eval_every=100", "launch.launcher=local"]
    full = train_local(th.test_config(shards, tmp_path / "a", *common))

    real = train_mod._rng_state
    def crash_at_step_4():  # DeepSpeed's model and optimizer files are written, the RNG is not
        if list((tmp_path / "b" / "demo" / "checkpoints").glob("*/.staging-step00000004")):
            raise RuntimeError("killed mid-save")
        return real()
    monkeypatch.setattr(train_mod, "_rng_state", crash_at_step_4)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        train_local(th.test_config(shards, tmp_path / "b", *common))
    monkeypatch.setattr(train_mod, "_rng_state", real)
    assert find_checkpoint(str(tmp_path / "b")).step == 2  # the half-written step 4 is not taken
    resumed = train_local(th.test_config(shards, tmp_path / "b", *common), resume=str(tmp_path / "b"))
    assert resumed.steps == 4 and resumed.losses == full.losses[2:]
    first, second = sorted((tmp_path / "b" / "demo" / "checkpoints").iterdir())  # two launches
    assert sorted(p.name for p in first.iterdir()) == [".staging-step00000004", "step00000002"]
    assert sorted(p.name for p in second.iterdir()) == ["step00000004"]
    assert find_checkpoint(str(tmp_path / "b")).url == str(second / "step00000004")


def test_a_crash_after_the_rename_leaves_no_marked_staging_folder(shards, tmp_path, monkeypatch):
    """The local launcher marks a checkpoint complete only once it is in place: a crash
    between the rename and the marker leaves the previous checkpoint the newest, and a bare
    --resume finds one run."""
    import dups.engine.checkpoints as ckpt

    common = ["train.iters=4", "train.checkpoint_every=2", "train.eval_every=100", "launch.launcher=local"]
    real = ckpt.os.replace
    def crash_after_renaming_step_4(src, dst):
        real(src, dst)
        if str(dst).endswith("step00000004"):
            raise RuntimeError("killed after the rename")
    monkeypatch.setattr(ckpt.os, "replace", crash_after_renaming_step_4)
    with pytest.raises(RuntimeError, match="killed after the rename"):
        train_local(th.test_config(shards, tmp_path, *common))
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert not list(tmp_path.glob("demo/checkpoints/*/.staging-*/*/complete.json"))
    assert find_checkpoint(str(tmp_path)).step == 2


def test_run_on_s3_resumes_evaluates_and_exports_from_s3(shards, tmp_path, s3_server, monkeypatch):
    from dups.cli import main
    from dups.engine.export import export_weights

    monkeypatch.chdir(tmp_path)
    boto3.client("s3").create_bucket(Bucket="runs")
    common = ["train.iters=4", "train.checkpoint_every=1", "train.eval_every=100", "launch.launcher=local",
              "train.output=s3://runs/out", "train.keep_checkpoints=2"]
    first = train_local(th.test_config(shards, tmp_path, *common), stop_after=2)
    launch = first.last_checkpoint.rsplit("/", 2)[1]
    assert first.last_checkpoint == f"s3://runs/out/demo/checkpoints/{launch}/step00000002"
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("**/step0000000*"))
    second = train_local(th.test_config(shards, tmp_path, *common), resume="s3://runs/out")
    assert second.steps == 4 and second.run_id == first.run_id
    again = second.last_checkpoint.rsplit("/", 2)[1]
    assert again > launch  # the resumed launch writes into a folder of its own
    names = s3_names("runs", "out/")
    steps = sorted({"/".join(n.split("/")[3:5]) for n in names})
    assert steps == [f"{launch}/step00000001", f"{launch}/step00000002",  # the newest 2 of each launch
                     f"{again}/step00000003", f"{again}/step00000004"], steps
    assert f"out/demo/checkpoints/{again}/step00000004/{COMPLETE}" in names
    assert f"out/demo/checkpoints/{again}/step00000004/rng_rank0.pt" in names

    # the readers take the train.output, a run's folder, a launch's, or a checkpoint, all on S3
    newest = f"s3://runs/out/demo/checkpoints/{again}/step00000004"
    for where in ("s3://runs/out", "s3://runs/out/demo", f"s3://runs/out/demo/checkpoints/{again}", newest):
        assert find_checkpoint(where).url == newest
    assert find_checkpoint(f"s3://runs/out/demo/checkpoints/{launch}").step == 2
    source = export_weights("s3://runs/out", "s3://runs/weights/demo.safetensors")
    assert source.endswith("step00000004")
    exported, _ = model_state("s3://runs/weights/demo.safetensors")
    from_ckpt, _ = model_state("s3://runs/out")
    assert exported.keys() == from_ckpt.keys()
    assert all(torch.equal(exported[k], from_ckpt[k]) and exported[k].dtype == torch.float32 for k in exported)
    assert "weights/demo.json" in s3_names("runs", "weights/")
    mlflow_uri = f"sqlite:///{tmp_path}/mlruns.db"
    assert main(["eval", "demo", f"data.train={shards}", f"tracking.uri={mlflow_uri}", "data.crop=64",
                 "--checkpoint", "s3://runs/out"]) == 0
    assert main(["export", "s3://runs/out", str(tmp_path / "w.safetensors")]) == 0
    local, _ = model_state(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(local[k], exported[k]) for k in exported)


def test_find_checkpoint_names_the_runs_when_several_are_found(tmp_path):
    for run in ("a", "b"):
        folder = tmp_path / run / "checkpoints" / "step00000001"
        folder.mkdir(parents=True)
        (folder / COMPLETE).write_text("{}")
    (tmp_path / "b" / "checkpoints" / "step00000009").mkdir()  # unfinished: never chosen
    with pytest.raises(ValueError, match="2 runs"):
        find_checkpoint(str(tmp_path))
    assert find_checkpoint(str(tmp_path), name="b").url == str(tmp_path / "b" / "checkpoints" / "step00000001")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path / "b" / "checkpoints" / "step00000009"))


def test_the_newest_launch_is_found_and_a_restart_stays_in_its_own(tmp_path):
    run = tmp_path / "ray" / "demo"
    for step, launch in ((4, "20261201-090000-aaaaaa"), (8, "20261205-120000-bbbbbb"),
                         (12, "20261205-120000-bbbbbb"), (16, "20261201-090000-aaaaaa"),
                         (20, "20261205-120000-bbbbbb")):
        (run / launch / f"step{step:08d}").mkdir(parents=True)
        (run / launch / f"step{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step != 20:  # the last one never finished
            mark_complete(str(run / launch / f"step{step:08d}"), step, 2)
    assert newest_complete(str(run / "20261205-120000-bbbbbb")).step == 12
    assert newest_complete(str(run / "20261201-090000-aaaaaa")).step == 16
    assert newest_complete(str(tmp_path / "nothing")) is None
    # a bare --resume continues the newest launch, though an older one went further
    for where in (tmp_path, run):
        assert find_checkpoint(str(where)).url == str(run / "20261205-120000-bbbbbb" / "step00000012")
    (run / "step00000002").mkdir()  # a checkpoint of the layout before launch folders
    mark_complete(str(run / "step00000002"), 2, 2)
    assert find_checkpoint(str(run)).step == 12


def test_pretraining_on_two_ray_workers_hands_its_weights_to_finetuning(tmp_path, monkeypatch):
    """Pre-training exports <output>/<name>/<name>.safetensors; a fine-tuning config that
    points there loads every encoder tensor; a backbone that does not fit is an error."""
    import ray
    from safetensors.torch import load_file, save_file

    import prep_fixtures as fx
    from dups.cluster.launch import train_ray
    from dups.data.prep import prepare
    from dups.config import load_config
    from dups.engine.distributed import init_single_process
    from dups.engine.trainer import Trainer

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    fx.imagenet(tmp_path / "in")
    prepare("imagenet", str(tmp_path / "in"), str(tmp_path / "shards"), progress=False, use_ray=False)
    cfg = load_config("pretrain_imagenet_tiny", [
        f"data.train={tmp_path / 'shards'}", f"train.output={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", "model.name=dups_demo", "model.num_classes=2",
        "data.image_size=64", "data.batch_size=1", "data.workers=0", "data.shuffle_buffer=2",
        "train.iters=2", "train.eval_every=100", "train.checkpoint_every=2", "launch.workers=2",
        "launch.use_gpu=false", "launch.cpus_per_worker=1", "engine.precision=fp32", "optim.warmup_iters=1"])
    staged_before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("dups-stage-")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = train_ray(cfg)
    finally:
        ray.shutdown()
    assert result.error is None
    staged = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("dups-stage-")}
    assert not staged - staged_before  # every rank removed its temporary copy
    weights = tmp_path / "runs" / "pretrain_imagenet_tiny" / "pretrain_imagenet_tiny.safetensors"
    exported = load_file(str(weights))
    assert len(list((tmp_path / "runs" / "ray" / "pretrain_imagenet_tiny").glob(f"*/step00000002/{COMPLETE}"))) == 1

    finetune = ["launch.launcher=local", f"train.pretrained={weights}"]
    init_single_process()
    trainer = Trainer(th.test_config(th.make_dataset(tmp_path / "seg", train=4, val=1), tmp_path / "ft",
                                     *finetune), _no_hooks())
    encoder = {f"encoder.{k}": v for k, v in trainer.model.encoder.state_dict().items()}
    assert encoder and all(torch.equal(encoder[k], exported[k]) for k in encoder)
    trainer.tracker.close()

    del exported["encoder.stem.weight"]  # a backbone that does not fit: named in the error
    exported["encoder.extra"] = torch.zeros(1)
    save_file(exported, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1: stem\.weight; unexpected 1: encoder\.extra"):
        Trainer(th.test_config(str(tmp_path / "seg" / "shards"), tmp_path / "ft2", "launch.launcher=local",
                               f"train.pretrained={tmp_path / 'bad.safetensors'}"), _no_hooks())


def _no_hooks():
    from dups.engine.trainer import RunHooks

    return RunHooks(stage_dir=lambda step: "", publish=lambda step, folder: "")


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_finetuning_configs_look_where_pretraining_exports(size):
    from dups.engine.checkpoints import join
    from dups.config import load_config

    pre = load_config(f"pretrain_imagenet_{size}", [])
    exported = join(join(pre.train.output, pre.name), f"{pre.name}.safetensors")
    for dataset in ("ade20k", "cocostuff", "cityscapes"):
        fine = load_config(f"finetune_{dataset}_{size}", [])
        assert fine.train.pretrained == exported and fine.model.name == pre.model.name


def test_ray_run_on_s3_publishes_complete_checkpoints_and_resumes(shards, tmp_path, s3_server, monkeypatch):
    """Two Ray Train workers with train.output on S3: every rank's part lands in one step folder
    marked complete, the newest N are kept, and --resume from the bucket continues the run."""
    import ray

    from dups.cluster.launch import train_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    boto3.client("s3").create_bucket(Bucket="runs")
    common = ["train.iters=3", "train.checkpoint_every=1", "train.eval_every=100", "launch.workers=2",
              "train.output=s3://runs/out", "train.keep_checkpoints=2"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = train_ray(th.test_config(shards, tmp_path, *common), stop_after=2)
        assert first.error is None
        launch = first.checkpoint.path.rstrip("/").rsplit("/", 2)[1]
        names = s3_names("runs", "out/ray/demo/")
        assert {f"out/ray/demo/{launch}/step00000002/{f}" for f in (COMPLETE, "rng_rank0.pt", "rng_rank1.pt")
                } <= set(names)
        assert find_checkpoint("s3://runs/out", "demo").step == 2
        second = train_ray(th.test_config(shards, tmp_path, *common), resume="s3://runs/out")
        assert second.error is None
        again = second.checkpoint.path.rstrip("/").rsplit("/", 2)[1]
    finally:
        ray.shutdown()
    steps = sorted({"/".join(n.split("/")[3:5]) for n in s3_names("runs", "out/ray/demo/") if "/step" in n})
    assert steps == [f"{launch}/step00000001", f"{launch}/step00000002", f"{again}/step00000003"], steps
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["resumed_from"].endswith("at step 2")
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == [1, 2, 3]


class _Payload:
    """Pickles as a call of os.system: what a booby-trapped checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused(tmp_path):
    from dups.engine.checkpoints import UnsafeFileError

    marker = tmp_path / "code-ran"
    evil = {"module": {"encoder.stem.weight": torch.zeros(1)}, "extra": _Payload(marker)}
    torch.save(evil, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match=r"evil\.pt: refused, not a weights-only file .*GLOBAL"):
        model_state(str(tmp_path / "evil.pt"))
    folder = tmp_path / "run" / "step00000001"  # the same payload inside a checkpoint folder
    folder.mkdir(parents=True)
    torch.save(evil, folder / "mp_rank_00_model_states.pt")
    (folder / COMPLETE).write_text("{}")
    with pytest.raises(UnsafeFileError, match="step00000001: refused"):
        model_state(str(tmp_path / "run"))
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


def test_a_fresh_ray_launch_starts_at_step_0_and_resume_takes_the_named_checkpoint(shards, tmp_path, monkeypatch):
    """A second launch of the same name without --resume is a new run (its own MLflow run,
    params and step 0), not a continuation of the first; --resume naming the first launch's
    checkpoint continues that one, though a newer launch exists. With keep_checkpoints=1 a
    complete checkpoint exists at every moment after the first."""
    import threading
    import time

    import ray
    from mlflow import MlflowClient

    from dups.cluster.launch import train_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    common = ["train.eval_every=100", "launch.workers=2", "train.checkpoint_every=2"]
    runs_dir, counts, stop = tmp_path / "ray" / "demo", [], threading.Event()

    def watch(skip: str):  # complete checkpoints of the second launch, polled
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            n = len([p for p in runs_dir.glob(f"*/step*/{COMPLETE}") if p.parts[-3] != skip])
            if n or counts:
                counts.append(n)
            time.sleep(0.005)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = train_ray(th.test_config(shards, tmp_path, "train.iters=2", *common))
        old = first.checkpoint.path.rstrip("/")
        watcher = threading.Thread(target=watch, args=(Path(old).parent.name,), daemon=True)
        watcher.start()
        second = train_ray(th.test_config(shards, tmp_path, "train.iters=4", "optim.lr=0.0005", *common,
                                          "train.checkpoint_every=1", "train.keep_checkpoints=1"))
        stop.set()
        watcher.join(timeout=10)
        third = train_ray(th.test_config(shards, tmp_path, "train.iters=4", *common), resume=old)
    finally:
        ray.shutdown()
    assert first.error is None and second.error is None and third.error is None
    assert len({Path(r.checkpoint.path).parent for r in (first, second, third)}) == 3
    assert counts and min(counts) == 1 and counts[-1] == 1, counts[:20]  # never none, never two for long
    assert [p.name for p in Path(second.checkpoint.path).parent.glob("step*")] == ["step00000004"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    continued, fresh = runs
    assert fresh.data.params["optim.lr"] == "0.0005" and "resumed_from" not in fresh.data.tags
    assert sorted(m.step for m in client.get_metric_history(fresh.info.run_id, "train/loss")) == [1, 2, 3, 4]
    assert continued.data.tags["resumed_from"] == f"{old} at step 2"
    assert sorted(m.step for m in client.get_metric_history(continued.info.run_id, "train/loss")) == [1, 2, 3, 4]
