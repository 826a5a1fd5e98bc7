"""The multi-node rehearsal on a two-node Ray cluster (ray.cluster_utils.Cluster, both nodes
on this machine): the prep job writes the same bytes as a one-worker local run, and a 2-worker
training job runs with one worker on each node."""
import os

from mlflow import MlflowClient

import prep_fixtures as fx
import train_helpers as th
from dups.cluster.launch import train_ray
from dups.data.prep import prepare

import pytest

pytestmark = pytest.mark.integration  # Ray, DeepSpeed engines, processes or servers: `pytest --integration`


def test_two_node_cluster_runs_prep_and_training(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    src = tmp_path / "ade"
    fx.ade20k_with_bad_inputs(src, train=6, val=2)
    single = prepare("ade20k", str(src), str(tmp_path / "single"), shard_bytes=25_000,
                     num_cpus=1, progress=False)
    assert single["run"]["nodes"] == 1

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        multi = prepare("ade20k", str(src), str(tmp_path / "multi"), shard_bytes=25_000, progress=False)
        cfg = th.test_config(str(tmp_path / "multi"), tmp_path, "train.iters=3", "train.checkpoint_every=3",
                             "train.eval_every=100", "launch.workers=2", "data.batch_size=1")
        result = train_ray(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
    assert multi["run"]["nodes"] == 2, "both nodes should have written shards"
    assert multi["splits"] == single["splits"] and len(multi["splits"]["train"]["shards"]) > 2
    for shard in multi["splits"]["train"]["shards"]:
        assert (tmp_path / "multi" / shard["name"]).read_bytes() == (tmp_path / "single" / shard["name"]).read_bytes()
    assert result.error is None and result.checkpoint is not None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    run = client.search_runs([client.get_experiment_by_name("dups-demo").experiment_id])[0]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3]
