"""Trained weights as an MLflow model: logged at the end of training and by `dups export
--mlflow`, registered, loaded with mlflow.pyfunc, served by `mlflow models serve` on
127.0.0.1; each answers what `dups predict` writes. Evaluation runs named by protocol; the
model's fields logged as params."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import train_helpers as th
from dups.cli import main as cli_main
from dups.cluster.launch import train_local
from conftest import wait_until_answers
from dups.engine.distributed import free_port

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-model")
    shards = th.make_dataset(root / "data", train=8, val=2)
    cfg = th.test_config(shards, root / "run", "train.iters=20", "train.checkpoint_every=20", "train.eval_every=1000",
                         "optim.lr=0.0005", "data.crop=96", "launch.launcher=local", "train.pictures=0",
                         "tracking.register_as=dups-demo")
    result = train_local(cfg)
    return {"root": root, "cfg": cfg, "result": result, "uri": cfg.tracking.uri,
            "images": sorted((root / "data" / "src" / "images" / "validation").glob("*.jpg"))}


def predicted_png(trained, tmp_path, image: Path) -> bytes:
    out = tmp_path / "pred"
    assert cli_main(["predict", str(image), "--checkpoint", trained["result"].last_checkpoint, "--out", str(out),
                     "--workers", "0"]) == 0
    return (out / "labels" / f"{image.stem}.png").read_bytes()


def labels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_training_logs_and_registers_a_model_that_predicts_as_dups_predict(trained, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(trained["uri"])
    run = client.get_run(trained["result"].run_id)
    assert run.data.tags["mlflow_model"].startswith("models:/")
    assert run.data.params["model.encoder.dims"] and run.data.params["model.decoder.dim"]  # fields, not {}
    assert "model.encoder" not in run.data.params
    version = client.get_model_version("dups-demo", "1")
    assert version.run_id == run.info.run_id
    mlflow.set_tracking_uri(trained["uri"])
    assert Path(run.info.artifact_uri[len("file://"):]).is_relative_to(trained["root"] / "run" / "mlruns")
    path_before = list(sys.path)
    model = mlflow.pyfunc.load_model("models:/dups-demo/1")
    assert sys.path == path_before  # no copy of the code put ahead of the installed package
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image"] and model.metadata.get_output_schema().input_names() == ["label"]
    images = trained["images"]
    answer = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    assert list(answer.columns) == ["label"] and len(answer) == len(images)
    for image, png in zip(images, answer["label"]):
        expected = labels_of(predicted_png(trained, tmp_path / image.stem, image))
        got = labels_of(png)
        assert got.shape == Image.open(image).size[::-1] and np.array_equal(got, expected)
        assert got.min() >= 1  # ADE20K's own ids, as dups predict writes

    # dups export --mlflow --register: the same weights, a second version, in the training run
    weights = tmp_path / "w" / "demo.safetensors"
    assert cli_main(["export", trained["result"].last_checkpoint, str(weights), "--register", "dups-demo",
                     "--tracking-uri", trained["uri"]]) == 0
    second = client.get_model_version("dups-demo", "2")
    assert second.run_id == run.info.run_id
    again = mlflow.pyfunc.load_model("models:/dups-demo/2").predict(pd.DataFrame({"image": [images[0].read_bytes()]}))
    assert np.array_equal(labels_of(again["label"][0]), labels_of(answer["label"][0]))

    # evaluation runs are named by their protocol
    assert cli_main(["eval", "demo", f"data.train={trained['cfg'].data.train}", f"tracking.uri={trained['uri']}",
                     "data.crop=96", "--checkpoint", trained["result"].last_checkpoint]) == 0
    assert cli_main(["eval", "demo", f"data.train={trained['cfg'].data.train}", f"tracking.uri={trained['uri']}",
                     "data.crop=96", "upsampling.policy=full", "eval.flip=true",
                     "--checkpoint", trained["result"].last_checkpoint]) == 0
    names = {r.info.run_name for r in client.search_runs([run.info.experiment_id])}
    assert {"eval-demo-dynamic", "eval-demo-full-flip"} <= names


def test_mlflow_models_serve_answers_a_request(trained, tmp_path):
    port = free_port()
    venv = str(Path(sys.executable).parent)  # mlflow runs uvicorn from PATH: an activated environment
    env = dict(os.environ, MLFLOW_TRACKING_URI=trained["uri"], PATH=f"{venv}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             "models:/dups-demo/1", "--env-manager", "local", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", proc, "mlflow models serve", seconds=180)
        image = trained["images"][0]
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(image.read_bytes()).decode()]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    cell = answer["predictions"][0]["label"]
    got = labels_of(base64.b64decode(cell))
    assert np.array_equal(got, labels_of(predicted_png(trained, tmp_path, image)))
