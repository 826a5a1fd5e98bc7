"""Credentials stay out of what others can read: job specs, stdout/stderr, the MLflow store,
checkpoints and exported weights."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_helpers as th
from conftest import wait_until_answers
from dups.cluster.credentials import forwarded_env, redact, redact_tree
from dups.engine.distributed import free_port

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`

ROOT = Path(__file__).resolve().parents[1]
SENTINELS = {"AWS_SECRET_ACCESS_KEY": "SENTINEL-aws-secret", "AWS_SESSION_TOKEN": "SENTINEL-aws-token",
             "password": "SENTINEL-mlflow-pw"}


def test_redact_and_what_is_forwarded():
    assert redact("see https://ann:s3cr%40t@mlflow.example:5000/x and http://host/y") == \
        "see https://ann:***@mlflow.example:5000/x and http://host/y"
    assert redact("sqlite:///runs/mlruns.db") == "sqlite:///runs/mlruns.db"
    assert redact_tree({"tracking": {"uri": "http://a:b@h"}, "n": 3, "l": ["http://a:b@h"]}) == \
        {"tracking": {"uri": "http://a:***@h"}, "n": 3, "l": ["http://a:***@h"]}
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
           "MLFLOW_TRACKING_URI": "http://u:p@h", "MLFLOW_EXPERIMENT_NAME": "e", "HOME": "/root"}
    assert forwarded_env(environ=env) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                          "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_EXPERIMENT_NAME": "e"}
    assert set(forwarded_env(True, env)) == set(env) - {"HOME"}
    from dups.cluster.credentials import split_userinfo
    from dups.tracking.runs import flatten

    assert split_userinfo("https://ann:p%40ss@h:5000/x") == ("https://h:5000/x", "ann", "p@ss")
    assert split_userinfo("sqlite:///a.db") == ("sqlite:///a.db", "", "")

    assert flatten({"tracking": {"uri": "http://a:b@h"}}) == {"tracking.uri": "http://a:***@h"}


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a sqlite store, as a user runs it."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{store}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--artifacts-destination", str(store / "artifacts")],
                            cwd=store, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_until_answers(f"http://127.0.0.1:{port}/health", proc, "mlflow server")
    yield port, store
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_training_and_export_leave_no_credential_anywhere(tmp_path, mlflow_server):
    port, store = mlflow_server
    shards = th.make_dataset(tmp_path / "data", train=4, val=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_SECRET_ACCESS_KEY=SENTINELS["AWS_SECRET_ACCESS_KEY"],
               AWS_SESSION_TOKEN=SENTINELS["AWS_SESSION_TOKEN"],
               MLFLOW_TRACKING_URI=f"http://dups:{SENTINELS['password']}@127.0.0.1:{port}")
    out = tmp_path / "out"
    train = [sys.executable, "-m", "dups.cli", "train", "demo", f"data.train={shards}", f"train.output={out}",
             "data.crop=64", "data.batch_size=2", "data.workers=0", "train.iters=2", "train.checkpoint_every=2",
             "train.eval_every=2", "train.log_every=1", "launch.launcher=local"]
    export = [sys.executable, "-m", "dups.cli", "export", str(out), str(out / "weights.safetensors")]
    outputs = []
    for command in (train, export):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs += [proc.stdout, proc.stderr]
    assert "mlflow ui --backend-store-uri http://" in outputs[0] and f"127.0.0.1:{port}" in outputs[0]
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{port}")
    runs = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])
    assert runs and runs[0].data.metrics["train/loss"] > 0  # the run did log through the URI
    assert all(SENTINELS["password"] not in v for v in runs[0].data.params.values())
    files = [p for p in [*out.rglob("*"), *store.rglob("*")] if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "config.json" for p in files)
    for secret in SENTINELS.values():
        assert not any(secret in text for text in outputs), [l for t in outputs for l in t.splitlines() if secret in l][:3]
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)
