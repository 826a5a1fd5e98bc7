"""ImageNet pre-training: the DUPS encoder as a classifier under the random upsampling
schedule, RandAugment / random erasing / Mixup / CutMix, top-1 and top-5 accuracy, and the
final weights exported where fine-tuning configs look."""
from __future__ import annotations

import logging

import torch

from dups.config import Config
from dups.data import augment
from dups.data.classification_aug import mix_batch, parse_rand_augment, soft_cross_entropy
from dups.models.classifier import build_classifier

log = logging.getLogger("dups.train")


class ClassificationTransform:
    """The training augmentation (picklable, for DataLoader workers)."""

    def __init__(self, size, rand_augment: str = "", random_erasing: float = 0.0):
        # parsed once here: a bad data.rand_augment fails at start-up, not in a loader worker
        self.size, self.random_erasing = size, random_erasing
        self.rand_augment = parse_rand_augment(rand_augment) if rand_augment else None

    @classmethod
    def of(cls, cfg: Config) -> "ClassificationTransform":
        d = cfg.data
        return cls(d.image_size, d.rand_augment, d.random_erasing)

    def __call__(self, sample, rng):
        return augment.train_classification(sample, self.size, rng, self.rand_augment, self.random_erasing)


class ClassificationEval:
    def __init__(self, size):
        self.size = size

    def __call__(self, sample):
        return augment.eval_classification(sample, self.size)


class ClassificationTask:
    decoder_saved = False  # a classifier has no decoder

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self):
        cfg = self.cfg
        model = build_classifier(cfg.model.name, cfg.model.num_classes, **cfg.model.encoder)
        model.schedule = (cfg.upsampling.random_start, cfg.upsampling.random_end, cfg.upsampling.random_shape)
        return model

    def train_transform(self):
        return ClassificationTransform.of(self.cfg)

    def eval_transform(self):
        return ClassificationEval(self.cfg.data.image_size)

    def start(self, step: int, device: torch.device) -> None:
        pass

    def loss(self, engine, images, labels, batch: dict, step: int, rank: int) -> dict:
        """Soft cross-entropy on a Mixup / CutMix batch at this step's upsampling ratio; the
        mixing draws are seeded by (seed, step, rank), so a resumed run replays them."""
        cfg, d = self.cfg, self.cfg.data
        engine.module.set_progress(step / cfg.train.iters)
        mixing = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + rank)
        images, targets = mix_batch(images, labels, cfg.model.num_classes, mixing, d.mixup, d.cutmix,
                                    d.mix_switch_prob, cfg.train.label_smoothing)
        return {"loss": soft_cross_entropy(engine(images), targets)}

    def protocol(self) -> str:
        return "classification"

    def evaluate(self, model, stream, device, dtype, tracker, names: str, pictures: int, classes: list):
        """(metrics, printable lines, the metrics again) of the model on ``stream``."""
        from dups.evaluation.evaluate import evaluate_classification

        metrics = evaluate_classification(model, stream, device, dtype)
        return metrics, "\n".join(f"{k}: {v:.2f}" for k, v in metrics.items()), metrics

    def finish(self, checkpoint: str, tracker) -> None:
        """Pre-training ends by exporting its weights where fine-tuning configs look:
        ``<train.output>/<name>/<name>.safetensors``."""
        from dups.engine.checkpoints import join
        from dups.engine.export import export_weights

        cfg = self.cfg
        out = join(join(cfg.train.output, cfg.name), f"{cfg.name}.safetensors")
        export_weights(checkpoint, out)
        tracker.tag("exported_weights", out)
        log.info("exported the pre-trained weights to %s", out)
