"""Launching the training loop: one local process, or Ray Train's TorchTrainer.

Ray Train V2: one worker per GPU (or CPU slot), gloo on CPU and NCCL on GPU; every rank saves
its DeepSpeed shard into its own fresh directory and reports it, and Ray merges the ranks'
files into one checkpoint in the run's storage (local path or S3). ``FailureConfig`` restarts
the workers, which find that checkpoint with ``ray.train.get_checkpoint()``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from pipeline.checkpoints import latest_checkpoint
from pipeline.config import Config

log = logging.getLogger("dups.launch")


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output) / cfg.name


def train_local(cfg: Config, resume: bool = False, stop_after: int | None = None):
    """One process, no Ray: how the loop runs on a single GPU machine (and in tests). The
    process group stays up for further runs; ``pipeline.engine.shutdown`` ends it."""
    from pipeline.engine import init_single_process
    from pipeline.train import RunHooks, train

    init_single_process()
    ckpt_root = run_dir(cfg) / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_root}")
    return train(cfg, RunHooks(checkpoint_dir=lambda step: str(ckpt_root), resume_from=resume_from,
                               stop_after=stop_after))


def pinned(cfg: Config) -> Config:
    """The config with relative paths and the tracking store made absolute on the driver:
    Ray workers run in other working directories (and on other machines)."""
    import copy

    from pipeline.tracking import resolve_uri

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


def ray_storage(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints and results: ``<train.output>/ray`` (local or S3)."""
    out = cfg.train.output
    return f"{out.rstrip('/')}/ray" if out.startswith("s3://") else str(Path(out).resolve() / "ray")


def _ray_loop(config: dict) -> None:
    """Runs inside every Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    from pipeline.config import load_config
    from pipeline.train import RunHooks, train

    cfg = load_config(None, config["overrides_flat"])
    resume_from = config.get("resume_from")
    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts us after a failure
    ctx = None
    if checkpoint is not None:
        ctx = checkpoint.as_directory()
        resume_from = ctx.__enter__()

    def checkpoint_dir(step: int) -> str:
        return tempfile.mkdtemp(prefix=f"dups-ckpt-{step}-")

    def on_checkpoint(step: int, directory: str, metrics: dict) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    try:
        train(cfg, RunHooks(checkpoint_dir, on_checkpoint, resume_from, config.get("stop_after"),
                            config.get("run_id")))
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
    """Ray Train TorchTrainer with ``cfg.launch.workers`` workers. ``resume``: a checkpoint
    directory (DeepSpeed or Ray) of an earlier run to continue."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = pinned(cfg)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=cfg.launch.address or None, include_dashboard=False, log_to_driver=True)
    use_gpu = cfg.launch.use_gpu and bool(ray.cluster_resources().get("GPU"))
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("AWS_", "MLFLOW_")) or k in ("OMP_NUM_THREADS",)}
    env.setdefault("OMP_NUM_THREADS", str(cfg.launch.cpus_per_worker))
    resume_from = latest_checkpoint(resume) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {resume}")
    run_id = None
    if resume_from is None:  # a fresh run: its MLflow run exists before any worker starts
        from pipeline.tracking import config_tracker

        tracker = config_tracker(cfg)
        run_id = tracker.run_id
        tracker.mlflow.end_run(status="RUNNING")
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"overrides_flat": flat_overrides(cfg), "resume_from": resume_from,
                           "stop_after": stop_after, "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.launch.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.launch.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage or ray_storage(cfg),
            failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env}),
    )
    return trainer.fit()
