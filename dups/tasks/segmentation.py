"""Fine-tuning for semantic segmentation: the DUPS segmentor, crop augmentation, the
Mask2Former losses with the score heads' MSE, mIoU with token-selection pictures, and the
final weights logged as an MLflow model."""
from __future__ import annotations

import torch

from dups.config import Config
from dups.data import augment
from dups.models.criterion import CriterionConfig, SegmentationCriterion
from dups.models.segmentor import build_segmentor, oracle_maps


class SegmentationTransform:
    """The training augmentation (picklable, for DataLoader workers)."""

    def __init__(self, crop, scale_range, photometric, edge_radius: int = 0):
        self.crop, self.scale_range, self.photometric = crop, scale_range, photometric
        self.edge_radius = edge_radius

    @classmethod
    def of(cls, cfg: Config) -> "SegmentationTransform":
        """A run's augmentation: its crop, scale jitter, photometric switch and score targets."""
        d = cfg.data
        return cls(d.crop, d.scale_range, d.photometric, cfg.upsampling.edge_radius)

    def __call__(self, sample, rng):
        return augment.train_segmentation(sample, self.crop, rng, self.scale_range, self.photometric,
                                          self.edge_radius)


class SegmentationEval:
    """Evaluation decoding: the short side resized, the score targets computed."""

    def __init__(self, short_side, edge_radius: int = 0):
        self.short_side, self.edge_radius = short_side, edge_radius

    @classmethod
    def of(cls, cfg: Config) -> "SegmentationEval":
        return cls(cfg.data.eval_short_side, cfg.upsampling.edge_radius)

    def __call__(self, sample):
        return augment.eval_segmentation(sample, self.short_side, self.edge_radius)


class SegmentationTask:
    decoder_saved = True  # a checkpoint records the decoder's fields too

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self):
        m = self.cfg.model
        return build_segmentor(m.name, m.num_classes, m.encoder, m.decoder)

    def train_transform(self):
        return SegmentationTransform.of(self.cfg)

    def eval_transform(self):
        return SegmentationEval.of(self.cfg)

    def start(self, step: int, device: torch.device) -> None:
        """Before the first step (``step``: where a resumed run goes on from)."""
        cfg = self.cfg
        self.criterion = SegmentationCriterion(cfg.model.num_classes,
                                               CriterionConfig(score_weight=cfg.upsampling.score_weight,
                                                               edge_radius=cfg.upsampling.edge_radius))
        self.policy = cfg.upsampling.ratio_policy()
        self.full_policy = cfg.upsampling.ratio_policy("full")
        self.oracle_gen = torch.Generator().manual_seed(cfg.train.seed + step)
        self.device = device

    def loss(self, engine, images, labels, batch: dict, step: int, rank: int) -> dict:
        """The loss terms of one batch (``loss`` the total) under eq. 2."""
        cfg = self.cfg
        maps = {k: v.to(self.device) for k, v in batch["scores"].items()}
        oracle = oracle_maps(maps, cfg.upsampling.oracle_rate, self.oracle_gen)
        policy = self.full_policy if in_full_warmup(step, cfg) else self.policy
        out = engine(images, policy, oracle_maps=oracle, eq1_masks=eq1_masks_at(step, cfg, policy))
        return self.criterion(out.predictions, labels, out.records, score_maps=maps)

    def protocol(self) -> str:
        """How an evaluation runs, for its run's name: the ratio policy, then ``ms`` / ``flip`` /
        ``slide`` where used (``dynamic``, ``full-ms-flip`` ...)."""
        cfg = self.cfg
        parts = [cfg.upsampling.policy]
        parts += [name for name, on in (("ms", cfg.eval.multi_scale), ("flip", cfg.eval.flip),
                                        ("slide", cfg.eval.sliding_window)) if on]
        return "-".join(parts)

    def evaluate(self, model, stream, device, dtype, tracker, names: str, pictures: int, classes: list):
        """(metrics, printable table, the ``EvalResult``) of the model on ``stream`` under the
        run's ratio policy; the table and ``pictures`` token-selection images go to ``tracker``
        (``names``: their file-name stem)."""
        from dups.evaluation.evaluate import evaluate

        cfg = self.cfg
        res = evaluate(model, stream, cfg.model.num_classes, cfg.upsampling.ratio_policy(), cfg.eval,
                       cfg.data.crop, device, dtype, pictures=pictures)
        table = res.table(classes)
        tracker.pictures(res.pictures, [f"tokens_{names}_{i}" for i in range(len(res.pictures))])
        tracker.text(table, f"eval/{names}.txt")
        return res.metrics(), table, res

    def finish(self, checkpoint: str, tracker) -> None:
        """The final weights as an MLflow model of the run (``dups.apis.serving`` loads it)."""
        if not (tracker.active and self.cfg.tracking.log_model):
            return
        import tempfile
        from pathlib import Path

        from dups.engine.export import export_weights

        with tempfile.TemporaryDirectory(prefix="dups-model-") as tmp:
            weights = str(Path(tmp) / f"{self.cfg.name}.safetensors")
            export_weights(checkpoint, weights)
            tracker.log_model(weights, self.cfg.tracking.register_as)


def in_full_warmup(step: int, cfg: Config) -> bool:
    """Whether the step (0-based) trains with full upsampling (``upsampling.full_warmup``)."""
    return step < cfg.upsampling.full_warmup * cfg.train.iters


def eq1_masks_at(step: int, cfg: Config, policy) -> bool:
    """Whether the step paints its mask features with eq. 1's tokens (``upsampling.eq1_mask_rate``;
    never under full upsampling or random selection); drawn from (seed, step), so a resumed
    run draws alike."""
    rate = cfg.upsampling.eq1_mask_rate
    if rate <= 0 or policy.kind in ("full", "random"):
        return False
    draw = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 7919 + 17)
    return rate >= 1 or float(torch.rand((), generator=draw)) < rate
