"""A two-node Ray cluster (ray.cluster_utils.Cluster, both nodes on this machine) writes the
same bytes as a one-worker local run: shard contents do not depend on the worker count."""
import os

import prep_fixtures as fx
from data_prep.job import prepare


def test_two_nodes_write_the_same_bytes_as_one_worker(tmp_path, monkeypatch):
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
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
    assert multi["run"]["nodes"] == 2, "both nodes should have written shards"
    assert multi["splits"] == single["splits"] and len(multi["splits"]["train"]["shards"]) > 2
    for shard in multi["splits"]["train"]["shards"]:
        assert (tmp_path / "multi" / shard["name"]).read_bytes() == (tmp_path / "single" / shard["name"]).read_bytes()
