"""A shortened `dups demo`: synth -> prep on local Ray -> 2-worker DeepSpeed training under Ray
Train -> eval -> MLflow, with the token picture in the run."""
import pytest
from mlflow import MlflowClient

from cluster.demo import run_demo


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_demo(out="demo_run", iters=16, train_images=12, val_images=2,
                       extra=["train.log_every=4"])
    out = capsys.readouterr().out
    assert "mIoU (dynamic upsampling)" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert f"{tmp_path}/mlruns.db" in out or "sqlite:///mlruns.db" in out
    assert 0 <= summary["miou"] <= 1
    assert 0 < summary["gflops_dynamic"] <= summary["gflops_full"]
    assert summary["tokens_dynamic"][3] <= summary["tokens_full"][3] == pytest.approx(
        summary["tokens_full"][3])
    client = MlflowClient("sqlite:///mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    train_run = next(r for r in runs if r.data.tags.get("task") == "finetune")
    pictures = [a.path for a in client.list_artifacts(train_run.info.run_id, "pictures")]
    assert pictures and pictures[0].endswith(".png")
    assert any(r.data.tags.get("task") == "eval" for r in runs)
