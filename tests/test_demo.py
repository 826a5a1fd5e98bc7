"""A shortened `dups demo`: synth -> prep on local Ray -> 2-worker DeepSpeed training under Ray
Train -> eval -> MLflow, with the token picture in the run."""
import pytest
from mlflow import MlflowClient

from dups.cluster.demo import run_demo

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_demo(out="demo_run", iters=16, train_images=12, val_images=2,
                       extra=["train.log_every=4"])
    out = capsys.readouterr().out
    assert "mIoU (dynamic upsampling)" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert f"{tmp_path}/mlruns.db" in out or "sqlite:///mlruns.db" in out
    assert 0 < summary["gflops_dynamic"] <= summary["gflops_full"]
    # full upsampling splits every token: n coarse tokens become n (1 + 4 + 16 + 64) by stage 4
    full, dynamic = summary["tokens_full"], summary["tokens_dynamic"]
    assert full == pytest.approx([full[0] * k for k in (1, 5, 21, 85)])
    assert dynamic[0] == full[0] and all(d <= f for d, f in zip(dynamic, full))
    client = MlflowClient("sqlite:///mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    train_run = next(r for r in runs if r.data.tags.get("task") == "finetune")
    pictures = [a.path for a in client.list_artifacts(train_run.info.run_id, "pictures")]
    assert pictures and pictures[0].endswith(".png")
    # several evaluations over training, drawn with the loss in the run's curves picture
    assert sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "val/mIoU")) == [5, 10, 15, 16]
    assert [a.path for a in client.list_artifacts(train_run.info.run_id, "plots")] == ["plots/curves.png"]
    evals = [r for r in runs if r.data.tags.get("task") == "eval" and r.data.params["upsampling.policy"] == "dynamic"]
    assert evals and evals[0].data.metrics["val/mIoU"] == pytest.approx(summary["mIoU"])
    assert f"mIoU (dynamic upsampling): {summary['mIoU']:.1f}%" in out
