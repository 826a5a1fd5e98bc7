"""`dups eval`: a checkpoint's weights on the validation split, in one process."""
from __future__ import annotations


import torch


from .config import Config
from .data import EvalStream, load_manifest, shards_of
from .evaluate import evaluate, evaluate_classification
from .tracking import config_tracker


def load_checkpoint_model(cfg: Config, checkpoint: str, device: torch.device):
    """(model in eval mode on ``device``, the checkpoint file found, validation manifest,
    validation shards): what every evaluation of a checkpoint starts from. The model is the
    one the checkpoint was trained as (``load_pretrained``), with ``cfg``'s model overrides."""
    from .pretrained import load_pretrained

    pre = load_pretrained(checkpoint, device, cfg)
    val_root = cfg.data.val or cfg.data.train
    manifest = load_manifest(val_root)
    return pre.model, pre.source, manifest, shards_of(val_root, manifest, "val")


def compare_policies(cfg: Config, checkpoint: str, policies: dict, device: torch.device,
                     images: int = 0) -> dict:
    """{name: EvalResult} of one checkpoint's validation images (the first ``images``; 0: all)
    under each named ``(RatioPolicy, oracle)``, single scale, the same decoded images for all:
    the side-by-side comparisons of ``benchmarks/dynamic.py`` and ``benchmarks/score_heads.py``."""
    from .config import EvalConfig
    from .train import _SegmentationEval

    model, _, _, shards = load_checkpoint_model(cfg, checkpoint, device)
    samples = list(EvalStream(shards, _SegmentationEval.of(cfg), 0, 1, images))
    return {name: evaluate(model, samples, cfg.model.num_classes, policy, EvalConfig(), cfg.data.crop, device,
                           oracle=oracle, progress=False) for name, (policy, oracle) in policies.items()}


def eval_protocol(cfg: Config) -> str:
    """How a segmentation evaluation ran, for its run's name: the ratio policy, then
    ``ms`` / ``flip`` / ``slide`` where used (``dynamic``, ``full-ms-flip`` ...)."""
    parts = [cfg.upsampling.policy]
    parts += [name for name, on in (("ms", cfg.eval.multi_scale), ("flip", cfg.eval.flip),
                                    ("slide", cfg.eval.sliding_window)) if on]
    return "-".join(parts)


def run_eval(cfg: Config, checkpoint: str):
    """(printable report, EvalResult or classification metrics) of a checkpoint."""
    from .train import _ClassificationEval, _SegmentationEval

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, where, manifest, shards = load_checkpoint_model(cfg, checkpoint, device)
    protocol = "classification" if cfg.train.task == "pretrain" else eval_protocol(cfg)
    tracker = config_tracker(cfg, run_name=f"eval-{cfg.name}-{protocol}",
                             tags={"checkpoint": where, "task": "eval", "protocol": protocol})
    try:
        if cfg.train.task == "pretrain":
            metrics = evaluate_classification(model, EvalStream(
                shards, _ClassificationEval(cfg.data.image_size), 0, 1, cfg.data.max_eval_images), device)
            tracker.metrics(metrics, 0)
            return "\n".join(f"{k}: {v:.2f}" for k, v in metrics.items()), metrics
        policy = cfg.upsampling.ratio_policy()
        stream = EvalStream(shards, _SegmentationEval.of(cfg), 0, 1, cfg.data.max_eval_images)
        res = evaluate(model, stream, cfg.model.num_classes, policy, cfg.eval, cfg.data.crop, device,
                       pictures=cfg.train.pictures)
        tracker.metrics(res.metrics(), 0)
        table = res.table(manifest.get("classes", []))
        tracker.text(table, "eval/results.txt")
        tracker.pictures(res.pictures, [f"tokens_{i}" for i in range(len(res.pictures))])
        return f"checkpoint {where}\n{table}", res
    finally:
        tracker.close()
