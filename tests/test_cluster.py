"""Cluster configs (Ray's own validation, batch arithmetic) and job submission to a real
`ray start --head` on 127.0.0.1 that the test starts and stops."""
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import wait_until_answers
from dups.config import load_config
from dups.engine.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "cluster").glob("aws-*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))
    gpus = {"aws-pretrain-16gpu.yaml": 16, "aws-finetune-4gpu.yaml": 8}[path.name]
    worker = raw["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"] == "p4d.24xlarge"  # 8 x A100 each
    assert worker["min_workers"] * 8 == gpus
    assert any("[gpu]" in c for c in raw["setup_commands"])
    broken = dict(raw, max_workers="two")
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_is_safe_and_installs_what_the_project_accepts(path):
    """The job API stays on the head's loopback; the setup installs a torch in the project's
    range; only the code is synced; the head may run the autoscaler; multi-node NCCL is placed."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    raw = yaml.safe_load(path.read_text())
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in path.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = next(Requirement(d).specifier for d in project if Requirement(d).name == "torch")
    installs = [re.search(r'pip install "(torch[^"]*)"', c) for c in raw["setup_commands"]]
    wanted = [Requirement(m.group(1)).specifier for m in installs if m]
    assert wanted == [torch_range]
    assert {".venv", ".git", "demo_run", "runs", "mlruns.db", "*.tar"} <= set(raw["rsync_exclude"])
    assert "ec2:RunInstances" in path.read_text() and "iam:PassRole" in path.read_text()
    worker = raw["available_node_types"]["gpu_worker"]
    if worker["min_workers"] > 1:  # NCCL across nodes
        assert worker["node_config"]["Placement"]["GroupName"]


@pytest.mark.parametrize("name,gpus,global_batch", [
    ("pretrain_imagenet_tiny", 16, 1024), ("pretrain_imagenet_base", 16, 1024),
    ("finetune_ade20k_tiny", 4, 32), ("finetune_cocostuff_small", 4, 32),
    ("finetune_cityscapes_base", 4, 16)])
def test_config_batch_arithmetic(name, gpus, global_batch):
    cfg = load_config(name)
    assert cfg.launch.workers == gpus and cfg.launch.use_gpu
    assert cfg.global_batch == cfg.data.batch_size * cfg.launch.workers * cfg.engine.grad_accum == global_batch
    if name.startswith("finetune"):
        assert cfg.train.iters == (90000 if "cityscapes" in name else 80000)
        assert cfg.data.crop == (1024 if "cityscapes" in name else 512)


def test_a_gpu_run_never_falls_back_to_cpus():
    from dups.cluster.launch import wants_gpus

    cfg = load_config("finetune_ade20k_tiny", ["launch.cpus_per_worker=1"])
    assert wants_gpus(cfg, {"CPU": 64, "GPU": 4}, joined=True)
    assert wants_gpus(cfg, {"CPU": 64}, joined=True)  # a cluster just up: Ray waits for the GPUs
    with pytest.raises(ValueError, match="launch.use_gpu=true but this machine has no GPU"):
        wants_gpus(cfg, {"CPU": 64}, joined=False)
    with pytest.raises(ValueError, match="need 4 CPUs; this machine's Ray has 2"):
        wants_gpus(cfg, {"CPU": 2, "GPU": 4}, joined=False)
    cpu = load_config("finetune_ade20k_tiny", ["launch.use_gpu=false", "launch.cpus_per_worker=1"])
    assert not wants_gpus(cpu, {"CPU": 4, "GPU": 4}, joined=False)


def test_local_launcher_refuses_use_gpu_without_cuda(tmp_path):
    import torch

    from dups.cluster.launch import train_local

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = load_config("finetune_ade20k_tiny", ["launch.launcher=local", f"train.output={tmp_path}"])
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        train_local(cfg)


@pytest.fixture
def ray_head():
    """A head started as the README says a user starts one by hand (`.venv/bin/ray start --head`,
    the environment not activated: the project's Python is not on PATH), with `--block` in its
    own process group; ended by group id, not `ray stop`."""
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a limit
    bindir = Path(sys.executable).parent
    port, dash = free_port(), free_port()
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != bindir.resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=path, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    wait_until_answers(f"{address}/api/version", proc, "the Ray head")
    yield address
    os.killpg(proc.pid, signal.SIGKILL)  # the head and everything it started (SIGTERM drains 30 s)
    proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def wait_status(client, job_id, wanted, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status in wanted:
            return status
        time.sleep(1)
    return status


@pytest.mark.integration
def test_submit_follow_list_logs_stop(ray_head, monkeypatch):
    from dups.cluster.submit import client, jobs, submit

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    out = io.StringIO()
    job = submit(["dups", "summary", "--model", "dups_demo", "--task", "backbone", "--image-size", "256",
                  "--json"], address=ray_head, follow=True, out=out)  # (`dups submit -- dups summary`)
    text = out.getvalue()
    assert f"submitted {job}" in text and '"tokens_per_stage"' in text and "SUCCEEDED" in text
    # a head whose Python lacks the project: a clear error in the job's log, not a traceback
    out = io.StringIO()
    submit(["summary"], address=ray_head, follow=True, out=out, python="/nonexistent/python")
    assert "no Python on the head imports torch and ray (tried: /nonexistent/python)" in out.getvalue()
    assert "FAILED" in out.getvalue()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "do-not-print-me" not in text  # not sent by default
    c = client(ray_head)
    long_job = submit(["synth", "--out", "/tmp/dups-stop-test", "--train", "100000"], address=ray_head, out=io.StringIO())
    assert wait_status(c, long_job, {"RUNNING"}, 60) == "RUNNING"
    listing = io.StringIO()
    jobs("list", address=ray_head, out=listing)
    assert job in listing.getvalue() and long_job in listing.getvalue()
    assert "dups summary --model dups_demo" in listing.getvalue()  # the command, not the shell around it
    jobs("stop", long_job, address=ray_head, out=io.StringIO())
    assert wait_status(c, long_job, {"STOPPED", "FAILED"}, 60) == "STOPPED"
    logs = io.StringIO()
    jobs("logs", job, address=ray_head, out=logs)
    assert '"model": "dups_demo"' in logs.getvalue()


@pytest.mark.integration
def test_a_ray_the_project_starts_listens_on_loopback_only(tmp_path):
    """Token authentication is off only for a local Ray, so that Ray must not be reachable
    from the network: every port of its processes is bound to 127.0.0.1."""

    script = (
        "import json, psutil, ray\n"
        "from dups.cluster.local_ray import init_ray\n"
        "init_ray(num_cpus=1, log_to_driver=False)\n"
        "def cmd(p):  # processes may be zombies or gone by the time they are read\n"
        "    try:\n"
        "        return p.cmdline() or []\n"
        "    except psutil.Error:\n"
        "        return []\n"
        "def listening(p):\n"
        "    try:\n"
        "        return [c.laddr.ip for c in p.net_connections('inet') if c.status == 'LISTEN']\n"
        "    except psutil.Error:\n"
        "        return []\n"
        "me = psutil.Process()\n"
        "procs = [me] + [p for p in psutil.process_iter() if 'ray' in ' '.join(cmd(p)).lower()\n"
        "        and p.pid != me.pid and any(str(me.pid) in a or 'session_' in a for a in cmd(p))]\n"
        "ips = sorted({ip for p in procs for ip in listening(p)})\n"
        "print(json.dumps({'node': ray.util.get_node_ip_address(), 'listen': ips}))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["node"] == "127.0.0.1"
    assert seen["listen"] and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in seen["listen"]), seen


def test_submit_refuses_an_unknown_command_before_contacting_the_cluster(capsys):
    from dups.cli import main

    # nothing listens on port 9: the refusal comes before any connection or upload
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "dups", "tran", "demo"]) == 2
    err = capsys.readouterr().err
    assert "unknown dups command 'tran' after --; choose one of" in err and "train" in err
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "dups"]) == 2
    assert "nothing to submit" in capsys.readouterr().err


def test_version(capsys):
    from importlib.metadata import version

    from dups.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"dups {version('dups')}"
