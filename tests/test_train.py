"""Training end to end on CPU: DeepSpeed ZeRO under Ray Train and in plain process groups,
exact resume, MLflow contents."""
import math
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

import train_helpers as th
from dups.cluster.launch import train_local, train_ray
from dups.engine.distributed import free_port

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return th.make_dataset(tmp_path_factory.mktemp("train-data"))


def mlflow_run(out, experiment="dups-demo"):
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def test_resume_continues_exactly_and_logs_to_the_same_run(shards, tmp_path):
    # eq1_mask_rate: steps 0 and 3 paint their mask features as eq. 1 would (a per-step draw a
    # resumed run must repeat)
    common = ["train.iters=6", "train.checkpoint_every=3", "train.eval_every=6", "launch.launcher=local",
              "upsampling.eq1_mask_rate=0.5"]
    full = train_local(th.test_config(shards, tmp_path / "a", *common))
    first = train_local(th.test_config(shards, tmp_path / "b", *common), stop_after=3)
    assert first.steps == 3
    second = train_local(th.test_config(shards, tmp_path / "b", *common), resume=str(tmp_path / "b"))
    assert second.steps == 6 and second.run_id == first.run_id
    assert first.losses + second.losses == full.losses  # bitwise: same batches, same RNG

    client, runs = mlflow_run(tmp_path / "b")
    assert len(runs) == 1
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # none counted twice
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(full.losses)
    assert run.data.params["model.name"] == "dups_demo" and run.data.params["optim.lr"] == "0.0001"
    logged = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert logged["train"]["iters"] == 6 and logged["optim"]["lr"] == 0.0001  # the merged config
    assert logged["data"]["scale_range"] == [0.5, 1.5]
    assert run.data.tags["git_revision"] and "step00000006" in run.data.tags["last_checkpoint"]
    assert "val/mIoU" in run.data.metrics and "val/gflops_mean" in run.data.metrics
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert pictures == ["pictures/tokens_step00000006_0.png"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/curves.png"]


def run_two_ranks(shards, out, overrides, evals: bool = False) -> dict[int, list[float]]:
    """Losses of each rank of a spawned 2-rank gloo group (no Ray); with ``evals``, the last
    evaluation's metrics."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=th.spawned_rank, args=(r, 2, port, overrides, shards, str(out), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + 300
    while len(results) < 2 and time.monotonic() < deadline:
        try:
            results.append(queue.get(timeout=2))
        except Exception:  # nothing yet: fail fast if a rank died
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert sorted(r[0] for r in results) == [0, 1] and all(p.exitcode == 0 for p in procs)
    assert all(r[1] == 3 for r in results)
    return {r[0]: r[3] if evals else r[2] for r in results}


def test_zero_stages_1_2_3_compute_the_same_training(shards, tmp_path):
    """ZeRO only partitions state: stages 1, 2 and 3 on two ranks give each rank the same
    losses step after step (the updates of steps 1 and 2 show in the losses of 2 and 3)."""
    common = ["train.iters=3", "train.eval_every=100", "train.checkpoint_every=3", "launch.workers=2",
              "optim.lr=0.001", "optim.warmup_iters=1"]
    losses = {stage: run_two_ranks(shards, tmp_path / str(stage), common + [f"engine.zero_stage={stage}"])
              for stage in (1, 2, 3)}
    for rank in (0, 1):
        for stage in (1, 3):
            assert losses[stage][rank] == pytest.approx(losses[2][rank], rel=1e-4), (stage, rank)
    assert losses[2][0] != losses[2][1]  # the ranks read different samples


def test_zero3_evaluates_when_a_rank_holds_no_image(tmp_path):
    """1 validation image on 2 ranks: under ZeRO-3 a forward gathers every parameter from every
    rank (the first forward at least; DeepSpeed keeps them gathered for the next ones), so
    rank 0's image would wait for ever for rank 1, which has none. (Every tensor partitioned:
    the demo model's are all below DeepSpeed's default threshold.)"""
    shards = th.make_dataset(tmp_path / "data", train=8, val=1)
    common = ["train.iters=3", "train.eval_every=3", "train.checkpoint_every=3", "launch.workers=2",
              "train.pictures=0", "optim.lr=0.001", "optim.warmup_iters=1", "engine.zero3_persist_below=0"]
    evals = {stage: run_two_ranks(shards, tmp_path / str(stage), common + [f"engine.zero_stage={stage}"], evals=True)
             for stage in (2, 3)}
    for rank in (0, 1):
        assert evals[3][rank].keys() == evals[2][rank].keys() and "val/mIoU" in evals[3][rank]
        for key, value in evals[2][rank].items():
            assert evals[3][rank][key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key


def test_two_ray_workers_zero2_learn_on_uneven_shards(shards, tmp_path, monkeypatch, capfd):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from dups.data.streams import load_manifest
    sizes = [s["samples"] for s in load_manifest(shards)["splits"]["train"]["shards"]]
    assert len(set(sizes)) > 1  # uneven shards: no rank may hang
    cfg = th.test_config(shards, tmp_path, "train.iters=24", "train.checkpoint_every=12",
                         "train.eval_every=24", "launch.workers=2", "engine.zero_stage=2",
                         "optim.lr=0.0002", "train.log_every=2")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        start = time.monotonic()
        result = train_ray(cfg)
        assert time.monotonic() - start < 400
    finally:
        ray.shutdown()
    assert result.error is None and result.checkpoint is not None
    # the workers' INFO lines reach the driver (and so a job's log); their progress is tqdm_ray's
    # bar drawn by the driver, not tqdm frames written into the log
    seen = capfd.readouterr()
    worker_lines = [line for line in (seen.out + seen.err).splitlines() if "RayTrainWorker" in line]
    assert any("dups.train step 24:" in line for line in worker_lines), worker_lines[-20:]
    assert not any("%|" in line for line in worker_lines)
    client, runs = mlflow_run(tmp_path)
    def history(key):
        return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == list(range(2, 25, 2))
    # the segmentation terms (the loss less the weighted score MSE, which is noisy this early)
    seg = [total - cfg.upsampling.score_weight * score
           for total, score in zip(history("train/loss"), history("train/loss_score"))]
    assert sum(seg[-3:]) / 3 < 0.9 * sum(seg[:3]) / 3, seg


def test_pretraining_on_imagenet_layout(tmp_path):
    """The classification task end to end in one process: random-ratio schedule, top-1/top-5."""
    import prep_fixtures as fx

    from dups.data.prep import prepare
    from dups.config import load_config

    fx.imagenet(tmp_path / "in")
    prepare("imagenet", str(tmp_path / "in"), str(tmp_path / "shards"), progress=False, use_ray=False)
    cfg = load_config("pretrain_imagenet_tiny", [
        f"data.train={tmp_path / 'shards'}", f"train.output={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        "model.name=dups_demo", "model.num_classes=2", "data.image_size=64", "data.batch_size=2",
        "data.workers=0", "data.shuffle_buffer=4", "train.iters=3", "train.eval_every=3",
        "train.checkpoint_every=3", "train.log_every=1", "launch.launcher=local", "launch.workers=1",
        "launch.use_gpu=false",
        "engine.precision=fp32", "optim.warmup_iters=1"])
    result = train_local(cfg)
    assert result.steps == 3 and set(result.eval) == {"val/top1", "val/top5", "val/images"}
    assert result.eval["val/images"] == 2
    # top-1 of the exported weights on the two validation images, computed independently
    from safetensors.torch import load_file

    from dups.models.classifier import build_classifier
    from dups.models.ratios import RatioPolicy
    from dups.data.streams import EvalStream, load_manifest, shards_of
    from dups.tasks.classification import ClassificationEval

    model = build_classifier("dups_demo", 2)
    model.load_state_dict(load_file(str(tmp_path / cfg.name / f"{cfg.name}.safetensors")))
    shards = shards_of(str(tmp_path / "shards"), load_manifest(str(tmp_path / "shards")), "val")
    samples = list(EvalStream(shards, ClassificationEval(64), 0, 1))
    torch.manual_seed(0)  # evaluation's own seed for the random token selection
    with torch.no_grad():
        logits = model.eval()(torch.stack([s["image"] for s in samples]), RatioPolicy("random", random_ratio=0.5))
    right = (logits.argmax(1) == torch.stack([s["label"] for s in samples])).float().mean()
    assert result.eval["val/top1"] == pytest.approx(100 * float(right))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    run = client.get_run(result.run_id)
    assert run.data.tags["task"] == "pretrain" and "val/top1" in run.data.metrics


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(shards, tmp_path, monkeypatch):
    """A step whose loss is not finite is skipped (the weights stay finite) and counted in
    train/skipped_steps; train.max_nonfinite_steps in a row stop the run, marked FAILED."""
    from dups.models.criterion import SegmentationCriterion

    real = SegmentationCriterion.forward
    bad_steps: set[int] = set()
    calls = {"n": 0}
    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        terms = real(self, *args, **kwargs)
        if calls["n"] in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms
    monkeypatch.setattr(SegmentationCriterion, "forward", sometimes_nan)
    common = ["train.iters=4", "train.checkpoint_every=4", "train.eval_every=100", "launch.launcher=local",
              "train.max_nonfinite_steps=2"]
    bad_steps.update({2})
    result = train_local(th.test_config(shards, tmp_path / "a", *common))
    assert result.steps == 4 and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 1)
    client, runs = mlflow_run(tmp_path / "a")
    skipped = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/skipped_steps")}
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 1} and runs[0].info.status == "FINISHED"

    calls["n"] = 0
    bad_steps.update({3})  # steps 2 and 3 in a row
    with pytest.raises(FloatingPointError, match=r"not finite for 2 steps in a row \(steps 2 to 3"):
        train_local(th.test_config(shards, tmp_path / "b", *common))
    client, runs = mlflow_run(tmp_path / "b")
    assert runs[0].info.status == "FAILED"
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")} == {1}


def test_bad_inputs_are_found_before_anything_starts(shards, tmp_path):
    import shutil

    from dups.engine.trainer import check_inputs

    cfg = th.test_config(shards, tmp_path, "model.num_classes=19")
    with pytest.raises(ValueError, match=r"manifest.json has 150 classes but model.num_classes=19"):
        check_inputs(cfg)
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = sorted(copy.glob("ade20k-train-*.tar"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 shard\(s\) of the train split .* missing: {victim.name}"):
        train_local(th.test_config(str(copy), tmp_path, "launch.launcher=local"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_inputs(th.test_config(shards, tmp_path, f"train.pretrained={tmp_path}/none.safetensors"))


def test_a_dataset_too_small_for_the_streams_fails_once_before_ray_starts(tmp_path):
    """Every stream (rank x loader worker) must fill a batch: found on the driver, one line,
    before Ray, MLflow or any worker starts (else every rank fails, in every restart)."""
    import ray

    shards = th.make_dataset(tmp_path / "data", train=6, val=1)
    cfg = th.test_config(shards, tmp_path, "launch.workers=2", "data.workers=2", "data.batch_size=2")
    with pytest.raises(ValueError, match=r"6 training samples are too few for 2 rank\(s\) \(launch.workers\) x "
                                         r"2 loader worker\(s\) \(data.workers\) x batch 2"):
        train_ray(cfg)
    assert not ray.is_initialized() and not (tmp_path / "mlruns.db").exists()
