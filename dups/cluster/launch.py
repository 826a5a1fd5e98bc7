"""Launching the training loop: one local process, or Ray Train's TorchTrainer.

Ray Train V2: one worker per GPU (or CPU slot), gloo on CPU and NCCL on GPU; every rank saves
its DeepSpeed shard into its own fresh directory and reports it, and Ray merges the ranks'
files into one checkpoint in the launch's storage (local path or S3). Every launch is a Ray
run of its own (named by ``new_launch_id``): ``FailureConfig`` restarts the workers of this
launch, which find its checkpoints with ``ray.train.get_checkpoint()``; a new launch starts
at step 0 unless ``--resume`` names a checkpoint to continue.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from dups.cluster.local_ray import init_ray
from dups.data.storage import open_storage
from dups.engine.checkpoints import (find_checkpoint, join, mark_complete, new_launch_id, newest_complete,
                                  prune, publish, saved_config, step_of, tag_of)
from dups.config import Config
from dups.cluster.credentials import forwarded_env
from dups.engine.trainer import RunHooks, check_inputs

log = logging.getLogger("dups.launch")


def checkpoints_dir(cfg: Config) -> str:
    """Where ``launch.launcher=local`` publishes checkpoints (local or S3), one folder per launch."""
    return join(join(cfg.train.output, cfg.name), "checkpoints")


def local_hooks(cfg: Config, resume_from: str | None = None, stop_after: int | None = None) -> RunHooks:
    """Checkpoints of ranks that share one filesystem (one process, or a spawned group), in
    this launch's own folder: each is written whole into a staging folder, then rank 0
    publishes it (a rename next to it, or an upload to S3 with ``complete.json`` last) and
    keeps the launch's newest ``train.keep_checkpoints``."""
    import torch.distributed as dist

    launch = [new_launch_id()]
    if dist.get_world_size() > 1:  # one folder for the group: rank 0's name
        dist.broadcast_object_list(launch, src=0)
    run = join(checkpoints_dir(cfg), launch[0])

    def stage_dir(step: int) -> str:
        d = (Path(run) / f".staging-{tag_of(step)}" if "://" not in run  # same filesystem: one rename
             else Path(tempfile.gettempdir()) / f"dups-staging-{os.getpid()}-{tag_of(step)}")
        if dist.get_rank() == 0 and d.exists():  # left by a crash at this very step
            shutil.rmtree(d)
        dist.barrier()
        return str(d)

    def publish_hook(step: int, folder: Path) -> str:
        dest = join(run, folder.name)
        if dist.get_rank() == 0:
            publish(folder, dest, step, dist.get_world_size())
            shutil.rmtree(folder.parent, ignore_errors=True)
            prune(run, cfg.train.keep_checkpoints)
        dist.barrier()
        return dest

    return RunHooks(stage_dir, publish_hook, resume_from, stop_after)


def resume_point(cfg: Config, resume: str | None) -> tuple[str | None, Config]:
    """The checkpoint to continue from: the newest complete one in ``resume`` (a checkpoint,
    a run's folder, or ``train.output``; local or S3), and ``cfg`` building the model that
    checkpoint was trained as (``dups.apis.pretrained.trained_as``), so code whose defaults
    changed since continues the same model."""
    if not resume:
        return None, cfg
    from dups.apis.pretrained import trained_as

    url = find_checkpoint(resume, cfg.name).url
    return url, trained_as(cfg, saved_config(url), join(url, "config.json"))


def train_local(cfg: Config, resume: str | None = None, stop_after: int | None = None):
    """One process, no Ray: how the loop runs on a single GPU machine (and in tests). The
    process group stays up for further runs; ``dups.engine.distributed.shutdown`` ends it.
    ``resume``: where to find the checkpoint to continue from (see ``resume_point``)."""
    import torch

    from dups.engine.distributed import init_single_process
    from dups.engine.trainer import train

    if cfg.launch.use_gpu and not torch.cuda.is_available():
        raise ValueError("launch.use_gpu=true but torch sees no CUDA device here: set "
                         "launch.use_gpu=false to train on the CPU")
    check_inputs(cfg, pretrained=resume is None)
    resume_from, cfg = resume_point(cfg, resume)
    init_single_process()
    return train(cfg, local_hooks(cfg, resume_from, stop_after))


def pinned(cfg: Config) -> Config:
    """The config with relative paths and the tracking store made absolute on the driver:
    Ray workers run in other working directories (and on other machines)."""
    import copy

    from dups.tracking.runs import resolve_uri

    c = copy.deepcopy(cfg)
    def absolute(path: str) -> str:
        return path if not path or "://" in path or os.path.isabs(path) else os.path.abspath(path)
    c.data.train, c.data.val = absolute(c.data.train), absolute(c.data.val)
    c.train.output, c.train.pretrained = absolute(c.train.output), absolute(c.train.pretrained)
    uri = resolve_uri(c.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif "://" not in uri:
        uri = os.path.abspath(uri)
    c.tracking.uri = uri
    return c


def wants_gpus(cfg: Config, resources: dict, joined: bool) -> bool:
    """Whether the workers get GPUs. A run that asks for GPUs never trains on CPUs silently: on
    a cluster it joined (``joined``) that has none yet, Ray's scaling config waits for the
    autoscaler to bring them; a Ray this process started on a machine without any is an error,
    and so is one with fewer CPUs than the workers ask for (Ray would wait for ever)."""
    cpus = cfg.launch.workers * cfg.launch.cpus_per_worker
    if not joined and resources.get("CPU", 0) < cpus:
        raise ValueError(f"launch.workers={cfg.launch.workers} x launch.cpus_per_worker="
                         f"{cfg.launch.cpus_per_worker} need {cpus} CPUs; this machine's Ray has "
                         f"{resources.get('CPU', 0):g}")
    if not cfg.launch.use_gpu:
        return False
    if resources.get("GPU", 0) >= 1:
        return True
    if not joined:
        raise ValueError("launch.use_gpu=true but this machine has no GPU for Ray: run on a GPU "
                         "cluster (--address / launch.address) or set launch.use_gpu=false to train on CPUs")
    log.warning("the Ray cluster has no GPU yet: waiting for %d GPU workers (the autoscaler starts "
                "them; Ray Train starts when they are up)", cfg.launch.workers)
    return True


def ray_storage(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints and results: ``<train.output>/ray`` (local or S3)."""
    out = cfg.train.output
    return f"{out.rstrip('/')}/ray" if out.startswith("s3://") else str(Path(out).resolve() / "ray")


FATAL = "fatal.json"  # in the launch's Ray storage: an error that restarts cannot get past

PERMANENT = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, ImportError,
             AssertionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class NotRestarted(RuntimeError):
    """A restart of a launch that already met an error a restart would meet again."""


def is_permanent(err: BaseException) -> bool:
    """Whether a restart would meet ``err`` again: a bad input or setting (a damaged shard, a
    config or file that does not fit), a missing file, a shape mismatch, out of memory, a bug.
    Not: I/O and network errors, a peer that died, a killed process (those Ray restarts)."""
    if isinstance(err, PERMANENT):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("size mismatch", "out of memory"))


def _one_line(err: BaseException) -> str:
    """The error's last line, led by its type (from a DataLoader worker it is there already)."""
    line = (str(err).strip().splitlines() or [""])[-1]
    if re.match(r"^[\w.]+(Error|Exception): ", line):
        return line
    kind = type(err).__name__ if type(err).__module__ == "builtins" else f"{type(err).__module__}.{type(err).__name__}"
    return f"{kind}: {line}"


def _ray_loop(config: dict) -> None:
    """Runs inside every Ray Train worker. Each rank writes its part of a checkpoint into its
    own temporary folder and reports it; Ray merges the parts in its storage under the step's
    name; rank 0 then marks the folder complete, keeps the launch's newest
    ``train.keep_checkpoints``, and every rank removes its temporary copy. An error that a
    restart would meet again (``is_permanent``: a damaged shard, weights that do not fit ...)
    stops the launch: Ray's restarts end at once instead of training up to it again."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from dups.config import load_config
    from dups.engine.progress import setup_logging
    from dups.engine.trainer import train

    setup_logging()  # a Ray worker starts without: the INFO lines would never reach the job log
    cfg = load_config(None, config["overrides_flat"])
    run = join(join(config["storage"], cfg.name), config["launch"])  # this launch's folder
    resume_from = config.get("resume_from")
    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts us after a failure
    ctx = None
    # Ray's controller registers a stored checkpoint a poll later: a worker dying in between
    # would otherwise restart from an older one, or from step 0
    newer = newest_complete(run)
    if newer is not None and newer.step > (step_of(checkpoint.path) if checkpoint else -1):
        resume_from = newer.url
    elif checkpoint is not None:
        ctx = checkpoint.as_directory()
        resume_from = ctx.__enter__()

    # one folder per run and rank, emptied first: a restarted worker clears what a killed one left
    stage = Path(tempfile.gettempdir()) / (f"dups-stage-{cfg.name}-{hashlib.sha1(run.encode()).hexdigest()[:8]}"
                                           f"-rank{ray.train.get_context().get_world_rank()}")

    def stage_dir(step: int) -> str:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        return str(stage)

    def publish_hook(step: int, folder: Path) -> str:
        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=folder.name)
        dist.barrier()  # every rank's part is stored
        dest = join(run, folder.name)
        if dist.get_rank() == 0:
            mark_complete(dest, step, dist.get_world_size())
            prune(run, cfg.train.keep_checkpoints)  # after: the newest kept is always complete
        shutil.rmtree(folder.parent, ignore_errors=True)
        return dest

    storage = open_storage(run)
    if storage.exists(FATAL):  # a restart would only meet the same error again
        raise NotRestarted(f"not restarted: {json.loads(storage.get_bytes(FATAL))['error']}")
    try:
        train(cfg, RunHooks(stage_dir, publish_hook, resume_from, config.get("stop_after"),
                            config.get("run_id")))
    except Exception as err:  # (from a DataLoader worker it keeps its type; its message ends with the original's)
        if is_permanent(err):
            storage.put_bytes(FATAL, json.dumps({"error": _one_line(err)}).encode())
        raise
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def flat_overrides(cfg: Config) -> list[str]:
    """The whole resolved config as key=value strings (how it travels to Ray workers)."""
    import json

    def walk(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict) and v and k not in ("encoder", "decoder"):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
    return list(walk(cfg.to_dict()))


def train_ray(cfg: Config, resume: str | None = None, stop_after: int | None = None,
              storage: str | None = None):
    """Ray Train TorchTrainer with ``cfg.launch.workers`` workers. ``resume``: where to find
    the checkpoint of an earlier run to continue (see ``resume_point``)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = pinned(cfg)
    check_inputs(cfg, pretrained=resume is None)
    resume_from, cfg = resume_point(cfg, resume)
    joined = bool(cfg.launch.address or os.environ.get("RAY_ADDRESS"))
    started = not ray.is_initialized()
    if started:
        init_ray(cfg.launch.address, include_dashboard=False, log_to_driver=True)
    try:
        use_gpu = wants_gpus(cfg, ray.cluster_resources(), joined)
    except ValueError:
        if started:
            ray.shutdown()
        raise
    env = forwarded_env(cfg.launch.forward_credentials)  # Ray's API shows a runtime env to all
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(cfg.launch.cpus_per_worker))
    storage = storage or ray_storage(cfg)
    launch = new_launch_id()
    log.info("launch %s: checkpoints in %s", launch, join(join(storage, cfg.name), launch))
    run_id = None
    if resume_from is None:  # a fresh run: its MLflow run exists before any worker starts
        from dups.tracking.runs import config_tracker

        tracker = config_tracker(cfg)
        run_id = tracker.run_id
        tracker.close("RUNNING")
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"overrides_flat": flat_overrides(cfg), "resume_from": resume_from,
                           "stop_after": stop_after, "run_id": run_id, "storage": storage,
                           "launch": launch},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.launch.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.launch.cpus_per_worker}),
        run_config=RunConfig(  # (Ray's own pruning would remove the newest complete checkpoint
            name=launch, storage_path=join(storage, cfg.name),  # before the next one is marked)
            failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
            worker_runtime_env={"env_vars": env}),
    )
    try:
        result = trainer.fit()
    except Exception:
        _mark_failed(cfg, run_id)
        raise
    if result.error is not None:
        _mark_failed(cfg, run_id)
    return result


def _mark_failed(cfg: Config, run_id: str | None) -> None:
    """A run whose workers died without closing it (killed, out of restarts) is FAILED."""
    if run_id:
        from mlflow import MlflowClient

        from dups.tracking.runs import client_uri

        MlflowClient(client_uri(cfg.tracking.uri)).set_terminated(run_id, "FAILED")
