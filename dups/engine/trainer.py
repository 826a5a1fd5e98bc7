"""The training loop: the same code under Ray Train, torchrun, or one plain process.

It only needs an initialised process group (rank and world from ``torch.distributed``); the
launcher decides where checkpoints go and what happens after one is saved (Ray reports it).
Every rank saves its DeepSpeed shard plus its RNG state; the checkpoint also holds the step,
the data position and the MLflow run id, so a restarted or resumed run continues exactly and
logs to the same run. Metrics are buffered on rank 0 and written to MLflow just before a
checkpoint is published; a restarted run skips the steps MLflow has already (``Tracker``'s
``logged_until``). So every step is logged once: a crash after the checkpoint cannot lose
its steps' metrics, and one before it replays steps that are not logged again.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dups.cluster.credentials import redact_tree
from dups.config import Config
from dups.data.streams import EvalStream, load_manifest, shards_of, train_loader
from dups.engine.checkpoints import local_copy, model_state, tag_of
from dups.engine.distributed import all_reduce_sum, build_engine, device_for_rank, input_dtype
from dups.engine.optim import build_optimizer, set_lr
from dups.engine.progress import ProgressBar
from dups.evaluation.measure import kernel_flop_counter, peak_tflops
from dups.models.classifier import load_backbone
from dups.models.config import resolved_fields
from dups.tasks import task_of
from dups.tracking.runs import Tracker, config_tracker

log = logging.getLogger("dups.train")


@dataclass
class RunHooks:
    """What the launcher decides. ``stage_dir(step)``: a local folder where this rank writes
    its part of the checkpoint (DeepSpeed puts it in ``<stage_dir>/step<N>``);
    ``publish(step, folder)`` runs on every rank once all have written, stores the checkpoint
    where it belongs (``complete.json`` last) and returns its location."""

    stage_dir: Callable[[int], str]
    publish: Callable[[int, Path], str]
    resume_from: str | None = None  # a checkpoint folder (local or s3://) to continue from
    stop_after: int | None = None  # stop early (tests: an interrupted run)
    run_id: str | None = None  # an MLflow run made by the launcher (every restart logs there)


@dataclass
class TrainResult:
    steps: int
    run_id: str | None
    last_checkpoint: str | None
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    logged: list[tuple[int, dict]] = field(default_factory=list)  # (step, train/* metrics) as logged


def check_inputs(cfg: Config, pretrained: bool = True) -> None:
    """Everything a run reads, checked before anything starts (a bad input must not become a
    crash on every rank, repeated by every restart): the manifests, every shard they list,
    their class count against ``model.num_classes``, and the pre-trained weights."""
    from dups.data.storage import open_storage

    if not cfg.data.train:
        raise ValueError("data.train is not set: point it at the output of `dups prep`")
    for root, split in ((cfg.data.train, "train"), (cfg.data.val or cfg.data.train, "val")):
        manifest = load_manifest(root)
        classes = manifest.get("num_classes", len(manifest.get("classes", [])))
        if classes and classes != cfg.model.num_classes:
            raise ValueError(f"{root}/manifest.json has {classes} classes but model.num_classes="
                             f"{cfg.model.num_classes}")
        names = set(open_storage(root).list())
        wanted = [s["name"] for s in manifest["splits"].get(split, {}).get("shards", []) if s["samples"]]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} shard(s) of the {split} split listed in "
                                    f"manifest.json are missing: {', '.join(missing[:5])}")
        if split == "train":  # every stream must fill a batch: else every rank fails, every restart
            samples = sum(s["samples"] for s in manifest["splits"].get(split, {}).get("shards", []))
            world = cfg.launch.workers if cfg.launch.launcher == "ray" else 1
            streams = world * max(1, cfg.data.workers)
            if samples // streams < cfg.data.batch_size:
                raise ValueError(
                    f"{root}: {samples} training samples are too few for {world} rank(s) (launch.workers) x "
                    f"{max(1, cfg.data.workers)} loader worker(s) (data.workers) x batch {cfg.data.batch_size} "
                    f"(data.batch_size): lower one of them")
    if pretrained and cfg.train.pretrained:
        from dups.engine.checkpoints import find_checkpoint, local_file

        if cfg.train.pretrained.endswith((".safetensors", ".pt")):
            with local_file(cfg.train.pretrained):
                pass
        else:
            find_checkpoint(cfg.train.pretrained)


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
        self.task = task_of(cfg)  # what pre-training and fine-tuning do differently
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = self.task.build_model()
        if cfg.train.pretrained and not hooks.resume_from:
            state, where = model_state(cfg.train.pretrained)
            report = load_backbone(self.model, state)
            if (report.missing or report.unexpected) and not cfg.train.pretrained_partial:
                raise ValueError(f"train.pretrained {where} does not fit {cfg.model.name}'s encoder: "
                                 f"{report} (train.pretrained_partial=true loads what matches)")
            if self.rank == 0:
                log.info("pre-trained backbone %s: %s", where, report)
        self.engine = build_engine(self.model.to(self.device), build_optimizer(self.model, cfg.optim), cfg)
        torch.manual_seed(cfg.train.seed + 1000 * self.rank + 1)  # per-rank randomness from here
        self.step, client = 0, {}
        self.nonfinite, self.in_a_row = 0, 0
        self.step_flops: int | None = None  # steps skipped for a non-finite loss: all, and lately
        if hooks.resume_from:
            client = self._load(hooks.resume_from)
        self.manifest = load_manifest(cfg.data.train)
        run_id = None
        if self.rank == 0:
            tracker = config_tracker(cfg, run_id=client.get("mlflow_run_id") or hooks.run_id)
            run_id = tracker.run_id
        self.run_id = _broadcast(run_id)
        self.tracker = tracker if self.rank == 0 else Tracker(False, run_id=self.run_id)
        if hooks.resume_from:  # a restart after a failure, or a resumed run: where it went on from
            self.tracker.tag("resumed_from", f"{hooks.resume_from} at step {self.step}")
        self.pending: list[tuple[int, dict]] = []
        self.task.start(self.step, self.device)
        self.loader, self.position = train_loader(
            shards_of(cfg.data.train, self.manifest, "train"), self.task.train_transform(), cfg.data.batch_size,
            self.rank, self.world, cfg.data.workers, cfg.train.seed, cfg.data.shuffle_buffer,
            client.get("data"))

    # --- checkpoints -------------------------------------------------------------------
    def _load(self, location: str) -> dict:
        with local_copy(location) as folder:
            path, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {location}")
            rng_file = folder / f"rng_rank{self.rank}.pt"
            if not rng_file.is_file():
                raise FileNotFoundError(f"{location} has no {rng_file.name}: it was written by "
                                        "another number of ranks, or is incomplete")
            _set_rng_state(torch.load(rng_file, weights_only=True))
        self.step = client["step"]
        if self.rank == 0:
            log.info("resumed from %s at step %d", location, self.step)
        return client

    def save(self) -> str:
        """Every part of the checkpoint (model, optimizer, RNG, data position, run id, config)
        is written on every rank before the launcher publishes it."""
        stage, tag = Path(self.hooks.stage_dir(self.step)), tag_of(self.step)
        config = redact_tree(self.cfg.to_dict())  # no tracking password in a checkpoint
        model = config["model"]  # every model field explicit: later default changes leave it be
        model["encoder"], decoder = resolved_fields(model["name"], model["encoder"], model["decoder"])
        if self.task.decoder_saved:
            model["decoder"] = decoder
        client = {"step": self.step, "data": self.position.state_dict(), "mlflow_run_id": self.run_id,
                  "config": config}
        self.engine.save_checkpoint(str(stage), tag=tag, client_state=client, save_latest=False)
        torch.save(_rng_state(), stage / tag / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            (stage / tag / "config.json").write_text(json.dumps(config, indent=1))
        dist.barrier()
        for step, metrics in self.pending:  # before the checkpoint counts: see the module docstring
            self.tracker.metrics(metrics, step)
        if self.pending:
            self.tracker.plot_curves()
        self.pending.clear()
        where = self.hooks.publish(self.step, stage / tag)
        self.tracker.tag("last_checkpoint", where)
        return where

    # --- one step ----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        images = batch["image"].to(self.device, self.dtype)
        labels = batch["label"].to(self.device)
        terms = self.task.loss(self.engine, images, labels, batch, self.step, self.rank)
        loss = terms["loss"]
        if all_reduce_sum((~torch.isfinite(loss.detach())).float()).item():
            self.nonfinite += 1  # on any rank: no rank steps, so the weights stay finite and equal
            return {"loss": float("nan"), "skipped": 1.0}
        self.engine.backward(loss)
        self.engine.step()
        return {k: float(v.detach()) for k, v in terms.items() if not k.startswith("aux")}

    def _check_skipped(self, terms: dict) -> None:
        """A step with a non-finite loss is skipped and counted; too many in a row stop the run."""
        self.in_a_row = self.in_a_row + 1 if terms.get("skipped") else 0
        limit = self.cfg.train.max_nonfinite_steps
        if limit and self.in_a_row >= limit:
            raise FloatingPointError(
                f"the loss was not finite for {self.in_a_row} steps in a row (steps "
                f"{self.step - self.in_a_row + 1} to {self.step}; train.max_nonfinite_steps={limit}): "
                "the run stops. Lower the learning rate, or check the data and the checkpoint")

    def run(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.train.iters
        stop = min(total, self.hooks.stop_after or total)
        result = TrainResult(self.step, self.run_id, None)
        batches = iter(self.loader)
        bar = ProgressBar(total, cfg.name, "it", initial=self.step, disable=self.rank != 0)
        tic = time.perf_counter()
        wait = 0.0
        while self.step < stop:
            lr_factor = set_lr(self.engine.optimizer, self.step, total, cfg.optim)
            terms = {}
            for _ in range(cfg.engine.grad_accum):
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                if self.step_flops is None:  # counted once: the model's FLOPs of a training step
                    with kernel_flop_counter() as counter:
                        terms = self.train_step(batch)
                    self.step_flops = counter.get_total_flops() * cfg.engine.grad_accum
                else:
                    terms = self.train_step(batch)
                self.position.advance()
            self.step += 1
            self._check_skipped(terms)
            result.losses.append(terms["loss"])
            bar.update(1, loss=f"{terms['loss']:.3f}")
            if self.step % cfg.train.log_every == 0 or self.step == stop:
                elapsed = time.perf_counter() - tic
                n = cfg.train.log_every if self.step % cfg.train.log_every == 0 else self.step % cfg.train.log_every
                images = n * cfg.data.batch_size * cfg.engine.grad_accum * self.world
                metrics = {f"train/{k}": v for k, v in terms.items() if k != "skipped" and v == v}
                metrics["train/skipped_steps"] = self.nonfinite + getattr(self.engine, "skipped_steps", 0)
                metrics.update({"train/lr": cfg.optim.lr * lr_factor, "train/images_per_s": images / elapsed,
                                "train/step_time_s": elapsed / n, "train/data_wait_s": wait / n,
                                "train/memory_gb": _memory_gb()})
                metrics.update(_utilisation(self.step_flops, elapsed / n, self.world, self.dtype))
                self.pending.append((self.step, metrics))
                result.logged.append((self.step, metrics))
                if self.rank == 0:
                    log.info("step %d: %s", self.step, ", ".join(f"{k[6:]} {v:.4g}" for k, v in metrics.items()))
                tic, wait = time.perf_counter(), 0.0
            if self.step % cfg.train.eval_every == 0 or self.step == total:
                result.eval = self.evaluate()
                self.pending.append((self.step, result.eval))
            if self.step % cfg.train.checkpoint_every == 0 or self.step == total or self.step == stop:
                result.last_checkpoint = self.save()
        bar.close()
        result.steps = self.step
        if self.step == total and self.rank == 0:  # the weights handed on: exported, or an MLflow model
            self.task.finish(result.last_checkpoint, self.tracker)
        return result

    def _eval_model(self):
        """The engine's module; under ZeRO-3 on several ranks a whole copy of it instead (the
        parameters gathered once, together): its forwards need no collective, so a rank with
        one image fewer than the others cannot leave them waiting in a parameter gather."""
        module = self.engine.module
        if self.cfg.engine.zero_stage != 3 or self.world == 1:
            return module
        import deepspeed

        with torch.random.fork_rng(devices=[]):  # building draws initial weights: not from the run's RNG
            whole = self.task.build_model()
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            whole.load_state_dict({k: v.detach().clone() for k, v in module.state_dict().items()})
        return whole.to(self.device, params[0].dtype)

    def evaluate(self) -> dict:
        cfg = self.cfg
        val_root = cfg.data.val or cfg.data.train
        manifest = self.manifest if val_root == cfg.data.train else load_manifest(val_root)
        stream = EvalStream(shards_of(val_root, manifest, "val"), self.task.eval_transform(), self.rank,
                            self.world, cfg.data.max_eval_images)
        metrics, _, _ = self.task.evaluate(self._eval_model(), stream, self.device, self.dtype, self.tracker,
                                        f"step{self.step:08d}", cfg.train.pictures if self.rank == 0 else 0,
                                        manifest.get("classes", []))
        return metrics


def _utilisation(step_flops: int, step_time: float, world: int, dtype: torch.dtype) -> dict[str, float]:
    """Achieved TFLOP/s of the whole run (counted FLOPs of the first step, forward and
    backward, as ``torch.utils.flop_counter`` counts them: 2 per multiply-add) and, on a GPU
    whose dense bf16 peak is known, model FLOPs utilisation."""
    out = {"train/tflops_per_s": step_flops * world / step_time / 1e12}
    peak = peak_tflops() if dtype == torch.bfloat16 else None
    if peak:
        out["train/mfu"] = out["train/tflops_per_s"] / world / peak
    return out


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(cfg: Config, hooks: RunHooks) -> TrainResult:
    """Runs (or continues) training in the current process group. A run that raises is
    marked FAILED in MLflow (a restart or resume sets it running again)."""
    trainer = Trainer(cfg, hooks)
    try:
        result = trainer.run()
    except BaseException:
        for step, metrics in trainer.pending:  # what it measured before failing
            trainer.tracker.metrics(metrics, step)
        trainer.tracker.close("FAILED")
        raise
    finally:
        del trainer.engine
    trainer.tracker.close("FINISHED" if result.steps == cfg.train.iters else "KILLED")
    return result
