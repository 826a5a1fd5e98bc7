"""`dups eval`: a checkpoint's weights on the validation split, in one process."""
from __future__ import annotations

import torch

from dups.config import Config
from dups.data.streams import EvalStream, load_manifest, shards_of
from dups.evaluation.evaluate import evaluate
from dups.tasks import task_of
from dups.tracking.runs import config_tracker


def load_checkpoint_model(cfg: Config, checkpoint: str, device: torch.device):
    """(model in eval mode on ``device``, the checkpoint file found, validation manifest,
    validation shards): what every evaluation of a checkpoint starts from. The model is the
    one the checkpoint was trained as (``load_pretrained``), with ``cfg``'s model overrides."""
    from dups.apis.pretrained import load_pretrained

    pre = load_pretrained(checkpoint, device, cfg)
    val_root = cfg.data.val or cfg.data.train
    manifest = load_manifest(val_root)
    return pre.model, pre.source, manifest, shards_of(val_root, manifest, "val")


def compare_policies(cfg: Config, checkpoint: str, policies: dict, device: torch.device,
                     images: int = 0) -> dict:
    """{name: EvalResult} of one checkpoint's validation images (the first ``images``; 0: all)
    under each named ``(RatioPolicy, oracle)``, single scale, the same decoded images for all:
    the side-by-side comparisons of ``benchmarks/dynamic.py`` and ``benchmarks/score_heads.py``."""
    from dups.config import EvalConfig
    from dups.tasks.segmentation import SegmentationEval

    model, _, _, shards = load_checkpoint_model(cfg, checkpoint, device)
    samples = list(EvalStream(shards, SegmentationEval.of(cfg), 0, 1, images))
    return {name: evaluate(model, samples, cfg.model.num_classes, policy, EvalConfig(), cfg.data.crop, device,
                           oracle=oracle, progress=False) for name, (policy, oracle) in policies.items()}


def run_eval(cfg: Config, checkpoint: str):
    """(printable report, ``EvalResult`` or, for a classifier, its metrics) of a checkpoint on
    the validation split, logged to a run of its own named by the protocol."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, where, manifest, shards = load_checkpoint_model(cfg, checkpoint, device)
    task = task_of(cfg)
    protocol = task.protocol()
    tracker = config_tracker(cfg, run_name=f"eval-{cfg.name}-{protocol}",
                             tags={"checkpoint": where, "task": "eval", "protocol": protocol})
    try:
        stream = EvalStream(shards, task.eval_transform(), 0, 1, cfg.data.max_eval_images)
        metrics, table, result = task.evaluate(model, stream, device, torch.float32, tracker, "results",
                                               cfg.train.pictures, manifest.get("classes", []))
        tracker.metrics(metrics, 0)
        return f"checkpoint {where}\n{table}", result
    finally:
        tracker.close()
