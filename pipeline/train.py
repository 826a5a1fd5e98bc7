"""The training loop: the same code under Ray Train, torchrun, or one plain process.

It only needs an initialised process group (rank and world from ``torch.distributed``); the
launcher decides where checkpoints go and what happens after one is saved (Ray reports it).
Every rank saves its DeepSpeed shard plus its RNG state; the checkpoint also holds the step,
the data position and the MLflow run id, so a restarted or resumed run continues exactly and
logs to the same run. Metrics are buffered on rank 0 and written to MLflow when a checkpoint
is saved: steps replayed after a crash were never logged, so no step is counted twice.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.classifier import build_classifier, load_backbone
from model.criterion import CriterionConfig, SegmentationCriterion
from model.ratios import RatioPolicy
from model.segmentor import build_segmentor, oracle_maps

from . import augment
from .checkpoints import model_state
from .config import Config
from .data import EvalStream, load_manifest, shards_of, train_loader
from .engine import build_engine, device_for_rank, input_dtype
from .optim import build_optimizer, set_lr
from .tracking import Tracker, config_tracker

log = logging.getLogger("dups.train")


@dataclass
class RunHooks:
    """What the launcher decides. ``checkpoint_dir(step)`` is where this rank saves;
    ``on_checkpoint(step, directory, metrics)`` runs on every rank after all have saved."""

    checkpoint_dir: Callable[[int], str]
    on_checkpoint: Callable[[int, str, dict], None] = lambda step, d, m: None
    resume_from: str | None = None  # a directory holding a DeepSpeed checkpoint ('latest')
    stop_after: int | None = None  # stop early (tests: an interrupted run)
    run_id: str | None = None  # an MLflow run made by the launcher (every restart logs there)


@dataclass
class TrainResult:
    steps: int
    run_id: str | None
    last_checkpoint: str | None
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)


def build_model(cfg: Config):
    if cfg.train.task == "pretrain":
        model = build_classifier(cfg.model.name, cfg.model.num_classes, **cfg.model.encoder)
        model.schedule = (cfg.upsampling.random_start, cfg.upsampling.random_end, cfg.upsampling.random_shape)
        return model
    return build_segmentor(cfg.model.name, cfg.model.num_classes, cfg.model.encoder, cfg.model.decoder)


def _broadcast(obj):
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    def __init__(self, cfg: Config, hooks: RunHooks):
        self.cfg, self.hooks = cfg, hooks
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device_for_rank()
        self.dtype = input_dtype(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg)
        if cfg.train.pretrained and not hooks.resume_from:
            state, _ = model_state(cfg.train.pretrained)
            report = load_backbone(self.model, state)
            if self.rank == 0:
                log.info("pre-trained backbone %s: %s", cfg.train.pretrained, report)
        self.engine = build_engine(self.model.to(self.device), build_optimizer(self.model, cfg.optim), cfg)
        self.pretrain = cfg.train.task == "pretrain"
        if not self.pretrain:
            self.criterion = SegmentationCriterion(cfg.model.num_classes,
                                                   CriterionConfig(score_weight=cfg.upsampling.score_weight))
            self.policy = RatioPolicy.from_preset(cfg.upsampling.policy, cfg.upsampling.preset)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank + 1)  # per-rank randomness from here
        self.step, client = 0, {}
        if hooks.resume_from:
            client = self._load(hooks.resume_from)
        self.manifest = load_manifest(cfg.data.train)
        run_id = None
        if self.rank == 0:
            tracker = config_tracker(cfg, run_id=client.get("mlflow_run_id") or hooks.run_id)
            run_id = tracker.run_id
        self.run_id = _broadcast(run_id)
        self.tracker = tracker if self.rank == 0 else Tracker(False, run_id=self.run_id)
        self.pending: list[tuple[int, dict]] = []
        self.oracle_gen = torch.Generator().manual_seed(cfg.train.seed + self.step)
        transform = self._train_transform()
        self.loader, self.position = train_loader(
            shards_of(cfg.data.train, self.manifest, "train"), transform, cfg.data.batch_size,
            self.rank, self.world, cfg.data.workers, cfg.train.seed, cfg.data.shuffle_buffer,
            client.get("data"))

    def _train_transform(self):
        d = self.cfg.data
        if self.pretrain:
            return _ClassificationTransform(d.image_size)
        return _SegmentationTransform(d.crop, d.scale_range, d.photometric)

    # --- checkpoints -------------------------------------------------------------------
    def _load(self, directory: str) -> dict:
        path, client = self.engine.load_checkpoint(directory)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        tag_dir = Path(path) if Path(path).is_dir() else Path(path).parent  # DeepSpeed returns a file
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("no %s: this rank's random state starts afresh", rng_file)
        self.step = client["step"]
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        return client

    def save(self) -> str:
        directory = self.hooks.checkpoint_dir(self.step)
        tag = f"step{self.step:08d}"
        client = {"step": self.step, "data": self.position.state_dict(), "mlflow_run_id": self.run_id,
                  "config": self.cfg.to_dict()}
        self.engine.save_checkpoint(directory, tag=tag, client_state=client)
        torch.save(_rng_state(), Path(directory) / tag / f"rng_rank{self.rank}.pt")
        dist.barrier()
        for step, metrics in self.pending:  # flushed only now: see the module docstring
            self.tracker.metrics(metrics, step)
        self.pending.clear()
        self.tracker.tag("last_checkpoint", os.path.join(directory, tag))
        self.hooks.on_checkpoint(self.step, directory, {"step": self.step})
        return directory

    # --- one step ----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        images = batch["image"].to(self.device, self.dtype)
        labels = batch["label"].to(self.device)
        if self.pretrain:
            self.model.set_progress(self.step / cfg.train.iters)
            loss = F.cross_entropy(self.engine(images).float(), labels)
            terms = {"loss": loss}
        else:
            oracle = oracle_maps(batch["label"], cfg.upsampling.oracle_rate, self.oracle_gen)
            if oracle is not None:
                oracle = {k: v.to(self.device) for k, v in oracle.items()}
            out = self.engine(images, self.policy, oracle_maps=oracle)
            maps = {k: v.to(self.device) for k, v in batch["scores"].items()}
            terms = self.criterion(out.predictions, labels, out.records, score_maps=maps)
            loss = terms["loss"]
        self.engine.backward(loss)
        self.engine.step()
        return {k: float(v.detach()) for k, v in terms.items() if not k.startswith("aux")}

    def run(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.train.iters
        stop = min(total, self.hooks.stop_after or total)
        result = TrainResult(self.step, self.run_id, None)
        batches = iter(self.loader)
        from tqdm import tqdm

        bar = tqdm(total=total, initial=self.step, disable=self.rank != 0, desc=cfg.name, unit="it")
        tic = time.perf_counter()
        wait = 0.0
        while self.step < stop:
            lr_factor = set_lr(self.engine.optimizer, self.step, total, cfg.optim)
            terms = {}
            for _ in range(cfg.engine.grad_accum):
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                terms = self.train_step(batch)
                self.position.advance()
            self.step += 1
            result.losses.append(terms["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
            if self.step % cfg.train.log_every == 0 or self.step == stop:
                elapsed = time.perf_counter() - tic
                n = cfg.train.log_every if self.step % cfg.train.log_every == 0 else self.step % cfg.train.log_every
                images = n * cfg.data.batch_size * cfg.engine.grad_accum * self.world
                metrics = {f"train/{k}": v for k, v in terms.items()}
                metrics.update({"train/lr": cfg.optim.lr * lr_factor, "train/images_per_s": images / elapsed,
                                "train/step_time_s": elapsed / n, "train/data_wait_s": wait / n,
                                "train/memory_gb": _memory_gb()})
                self.pending.append((self.step, metrics))
                tic, wait = time.perf_counter(), 0.0
            if self.step % cfg.train.eval_every == 0 or self.step == total:
                result.eval = self.evaluate()
                self.pending.append((self.step, result.eval))
            if self.step % cfg.train.checkpoint_every == 0 or self.step == total or self.step == stop:
                result.last_checkpoint = self.save()
        bar.close()
        result.steps = self.step
        if self.step == total:
            self.tracker.close()
        return result

    def evaluate(self) -> dict:
        from .evaluate import evaluate, evaluate_classification

        cfg = self.cfg
        val_root = cfg.data.val or cfg.data.train
        manifest = self.manifest if val_root == cfg.data.train else load_manifest(val_root)
        shards = shards_of(val_root, manifest, "val")
        model = self.engine.module
        if self.pretrain:
            stream = EvalStream(shards, _ClassificationEval(cfg.data.image_size), self.rank, self.world,
                                cfg.data.max_eval_images)
            return evaluate_classification(model, stream, self.device, self.dtype)
        stream = EvalStream(shards, _SegmentationEval(cfg.data.eval_short_side), self.rank, self.world,
                            cfg.data.max_eval_images)
        policy = RatioPolicy.from_preset(cfg.upsampling.policy, cfg.upsampling.preset)
        res = evaluate(model, stream, cfg.model.num_classes, policy, cfg.eval, cfg.data.crop, self.device,
                       self.dtype, pictures=cfg.train.pictures if self.rank == 0 else 0)
        if self.rank == 0:
            self.tracker.pictures(res.pictures, [f"tokens_step{self.step:08d}_{i}" for i in range(len(res.pictures))])
            self.tracker.text(res.table(manifest.get("classes", [])), f"eval/step{self.step:08d}.txt")
        return res.metrics()


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _SegmentationTransform:
    """Picklable (DataLoader workers) wrapper of the training augmentation."""

    def __init__(self, crop, scale_range, photometric):
        self.crop, self.scale_range, self.photometric = crop, scale_range, photometric

    def __call__(self, sample, rng):
        return augment.train_segmentation(sample, self.crop, rng, self.scale_range, self.photometric)


class _ClassificationTransform:
    def __init__(self, size):
        self.size = size

    def __call__(self, sample, rng):
        return augment.train_classification(sample, self.size, rng)


class _SegmentationEval:
    def __init__(self, short_side):
        self.short_side = short_side

    def __call__(self, sample):
        return augment.eval_segmentation(sample, self.short_side)


class _ClassificationEval:
    def __init__(self, size):
        self.size = size

    def __call__(self, sample):
        return augment.eval_classification(sample, self.size)


def train(cfg: Config, hooks: RunHooks) -> TrainResult:
    """Runs (or continues) training in the current process group."""
    trainer = Trainer(cfg, hooks)
    try:
        return trainer.run()
    finally:
        trainer.tracker.close()
        del trainer.engine
